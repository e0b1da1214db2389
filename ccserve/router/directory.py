"""What the gateway answers itself, to any client and without a token: the list of nodes and a listed node's fresh
evidence. A client fetches both through the relay (as inner OHTTP requests), so it verifies every node before it
seals a request to them all, and no node learns the address of the client verifying it.

    GET /nodes                                    the healthy, attested nodes (as the gateway's GET /nodes)
    GET /nodes/<node id>/attestation?nonce=<hex>  that node's GET /attestation for the client's own nonce

Neither carries request content, so neither needs a token, and neither goes through the router's draw: an
evidence fetch names its node, which is the point of it (a prompt never travels this way: GET, no body, one
fixed path). Only a transport failure marks the node failed, as for any request.
"""
from __future__ import annotations

import json
import re

import httpx

from ccserve.router import bhttp
from ccserve.router.nodes import Node, NodeRegistry

LISTING = "/nodes"
_EVIDENCE = re.compile(r"/nodes/([0-9a-f]{64})/attestation\?nonce=([0-9a-f]{32,128})")
MAX_EVIDENCE_BYTES = 1 << 20


def is_directory(inner: bhttp.Request) -> bool:
    return inner.path == LISTING or inner.path.startswith(LISTING + "/")


def listing(registry: NodeRegistry) -> dict:
    return {"nodes": [node.listing() for node in registry.healthy()]}


async def answer(inner: bhttp.Request, registry: NodeRegistry, http: httpx.AsyncClient) -> bhttp.Response:
    """The gateway's own answer to a directory request (is_directory(inner))."""
    if inner.method != "GET":
        return _json(405, _error("the node directory answers GET only"))
    if inner.path == LISTING:
        return _json(200, listing(registry))
    match = _EVIDENCE.fullmatch(inner.path)
    if match is None:
        return _json(404, _error("directory paths are /nodes and /nodes/<node id>/attestation?nonce=<hex>"))
    node = next((n for n in registry.healthy() if n.node_id == match.group(1)), None)
    if node is None:
        return _json(404, _error("no healthy, attested node has this id: fetch /nodes again"))
    return await _evidence(node, match.group(2), registry, http)


async def _evidence(node: Node, nonce_hex: str, registry: NodeRegistry, http: httpx.AsyncClient) -> bhttp.Response:
    try:
        response = await http.get(f"{node.url}/attestation", params={"nonce": nonce_hex})
    except httpx.TransportError:
        registry.mark_failed(node.node_id)
        return _json(502, _error("the node could not be reached; it is now avoided: fetch /nodes again"))
    if len(response.content) > MAX_EVIDENCE_BYTES:
        return _json(502, _error("the node's evidence is larger than the gateway forwards"))
    return bhttp.Response(response.status_code, [("content-type", response.headers.get("content-type", ""))],
                          response.content)


def _error(message: str) -> dict:
    return {"error": {"message": message}}


def _json(status: int, body: dict) -> bhttp.Response:
    return bhttp.Response(status, [("content-type", "application/json")], json.dumps(body).encode())
