"""The router's decision is independent of every request field: with the same random stream, two runs of
requests that differ in everything a client controls (body, size, path, headers, token, whole or streamed)
go to the same nodes, one for one. Driven through the real relay and gateway over HTTP."""
import json
import os
import random

from ccserve.router import bhttp
from ccserve.router.policy import Router


def node_of(client, request: bhttp.Request) -> str:
    if request.header("accept") == "text/event-stream":
        events = list(client.stream(request))
        assert events[0].status == 200
        return b"".join(e for e in events if isinstance(e, bytes)).split()[1].decode()
    response = client.send(request)
    assert response.status == 200
    return json.loads(response.content)["node"]


def varied_requests(deployment, rng: random.Random, n: int) -> list[bhttp.Request]:
    out = []
    for _ in range(n):
        size = rng.choice([0, 1, 100, 5_000, 200_000])
        extra = [(f"x-{rng.randrange(10**6)}", "v" * rng.randint(1, 50))] if rng.random() < 0.5 else []
        out.append(deployment.request(rng.randbytes(size), stream=rng.random() < 0.4, extra=extra,
                                      path=rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/x"])))
    return out


def test_same_random_stream_same_choices_whatever_the_content(deployment):
    first = varied_requests(deployment, random.Random(1), 24)
    second = varied_requests(deployment, random.Random(2), 24)
    assert [r.content for r in first] != [r.content for r in second]

    deployment.gateway.router = Router(random.Random(1234))
    choices_first = [node_of(deployment.client, r) for r in first]
    deployment.gateway.router = Router(random.Random(1234))
    choices_second = [node_of(deployment.client, r) for r in second]
    assert choices_first == choices_second
    assert len(set(choices_first)) > 1, "the stream must actually pick different nodes"

    # and the same stream replayed against the bare policy gives the same sequence: nothing else is consulted
    policy, nodes = Router(random.Random(1234)), deployment.gateway.registry.healthy()
    by_url = {node.server.url: node.name for node in deployment.nodes}
    assert [by_url[policy.choose(nodes).url] for _ in first] == choices_first


def test_a_different_stream_gives_different_choices(deployment):
    """The check above can fail: the choices do follow the random stream."""
    requests = [deployment.request(os.urandom(10)) for _ in range(20)]
    deployment.gateway.router = Router(random.Random(1))
    a = [node_of(deployment.client, r) for r in requests[:10]]
    deployment.gateway.router = Router(random.Random(2))
    b = [node_of(deployment.client, r) for r in requests[10:]]
    assert a != b
