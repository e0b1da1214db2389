"""`ccserve serve --attest [--router URL]`: the node's identity, and its registration with a router.

The identity (ccserve.attest.NodeIdentity) is made at start: keys in memory, and the measurement of this code, the
effective configuration and the weights, computed exactly as `ccserve release` computes it from the same flags,
so a node started with the flags of a published release carries that release's measurement. With a router, the
node registers through ccserve.router.node_agent: its first report carries evidence for the router's nonce, and
heartbeats follow every few seconds. A router that refuses the node stops it from starting, with the router's
reason (usually: this exact release is not in the transparency log yet).
"""
from __future__ import annotations

import logging

import httpx

from ccserve.attest.identity import NodeIdentity
from ccserve.attest.measure import measurement_config
from ccserve.config import EngineConfig, ServerOptions
from ccserve.router.errors import NodeRefused
from ccserve.router.node_agent import NodeAgent

log = logging.getLogger(__name__)


def node_identity(config: EngineConfig, options: ServerOptions) -> NodeIdentity:
    """Measure this node (weights hashed behind a progress bar) and make its keys."""
    identity = NodeIdentity.create(measurement_config(config, options), config.model)
    log.info("attesting as measurement %s (root of trust: %s)", identity.measurement.digest, identity.root)
    return identity


def register(identity: NodeIdentity, config: EngineConfig, options: ServerOptions, url: str) -> NodeAgent:
    """Attest to the router and keep reporting to it; ValueError (the CLI prints it) when it refuses or is down."""
    advertised = options.advertise_url or url
    capacity = options.capacity or config.max_num_seqs
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    agent = NodeAgent(options.router, advertised, capacity, identity)
    try:
        agent.start()
    except NodeRefused as exc:
        raise ValueError(f"the router at {options.router} refused this node: {exc}. If the release is not "
                         "published, run `ccserve release` with the flags this node was started with") from None
    except httpx.HTTPError as exc:
        raise ValueError(f"the router at {options.router} cannot be reached ({type(exc).__name__}): start "
                         "`ccserve router` first, or check --router") from None
    log.info("registered with the router as node %s at %s, capacity %d", identity.signing_public_key.hex()[:16],
             advertised, capacity)
    return agent
