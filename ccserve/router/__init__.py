"""The oblivious, non-targetable path from a client to a node (see docs/router.md).

    client --(OHTTP)--> relay --> gateway/router --(random node, by capacity)--> node
             ^ token from the issuer (RSA blind signature), spent once at the gateway

relay.py    sees the client's address and ciphertext; forwards, strips headers, logs only aggregates
gateway.py  sees the inner request (its body sealed to the nodes) and a token, never the client's address
policy.py   picks the node: random in proportion to capacity, from nothing a request carries
nodes.py    which nodes are healthy and attested (signed reports), node_agent.py the node's side of it
attestation.py  which nodes count as attested: their evidence checked against the transparency log
directory.py    what the gateway answers itself: the node list and each node's evidence, for clients
issuer.py   signs blinded tokens for authenticated clients; tokens.py the token format and spent set
ohttp.py, ohttp_chunked.py, bhttp.py, blind_rsa.py, varint.py   the protocols (RFC 9458, its chunked draft,
            RFC 9292, RFC 9474, RFC 9000 varints), tested against their published vectors
oblivious.py  the client's side of the relay path; simulate.py the non-targetability measurement

This package never imports server/ or engine/ and never sees a plaintext prompt or a user identity.
"""
