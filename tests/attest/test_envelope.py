"""The sealed envelope (version 2): any listed node opens the request, nobody else; every tampering of the request,
its recipient list or the response stream is refused."""
import copy
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ccserve.attest.envelope import (FRAME_HEAD, HDR, MAX_RECIPIENTS, RECIPIENT_LEN, RESPONSE_NONCE_LEN, key_id,
                                     open_request, seal_request)
from ccserve.attest.errors import SealedMessageError


def keypair():
    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def frames(stream: bytes) -> tuple[bytes, list[bytes]]:
    """(response nonce, frames) of a sealed response."""
    nonce, rest, out = stream[:RESPONSE_NONCE_LEN], stream[RESPONSE_NONCE_LEN:], []
    while rest:
        _, length = FRAME_HEAD.unpack_from(rest)
        out.append(rest[:FRAME_HEAD.size + length])
        rest = rest[FRAME_HEAD.size + length:]
    return nonce, out


def exchange(chunks=(b"one", b"two", b"three"), n_nodes=1, opener_index=0):
    nodes = [keypair() for _ in range(n_nodes)]
    request, opener = seal_request([pk for _, pk in nodes], b'{"prompt": "secret"}')
    body, sealer = open_request(nodes[opener_index][0], request)
    stream = b"".join(sealer.seal(c) for c in chunks[:-1]) + sealer.final(chunks[-1])
    return body, stream, opener


def test_round_trip_streamed_byte_by_byte():
    body, stream, opener = exchange()
    assert body == b'{"prompt": "secret"}'
    out = []
    for i in range(len(stream)):
        out += opener.feed(stream[i:i + 1])
    opener.finish()
    assert out == [b"one", b"two", b"three"] and opener.done


@pytest.mark.parametrize("which", [0, 1, 2])
def test_any_recipient_opens_and_its_response_opens_at_the_client(which):
    body, stream, opener = exchange(n_nodes=3, opener_index=which)
    assert body == b'{"prompt": "secret"}' and opener.open_all(stream) == b"onetwothree"


def test_the_request_names_each_recipient_key_once():
    nodes = [keypair() for _ in range(3)]
    keys = [pk for _, pk in nodes]
    request, _ = seal_request(keys + [keys[0]], b"hello")
    version, _, _, _, count = HDR.unpack_from(request)
    assert version == 2 and count == 3
    named = [request[HDR.size + i * RECIPIENT_LEN:][:8] for i in range(count)]
    assert named == [key_id(pk) for pk in keys]
    with pytest.raises(ValueError, match="1 to"):
        seal_request([], b"hello")
    with pytest.raises(ValueError, match="1 to"):
        seal_request([bytes([i % 256, i // 256]) * 16 for i in range(MAX_RECIPIENTS + 1)], b"hello")


def test_ciphertext_hides_the_content():
    _, pk = keypair()
    request, _ = seal_request([pk], b"a very secret prompt")
    assert b"secret" not in request
    _, stream, _ = exchange((b"a very secret answer",))
    assert b"secret" not in stream


def test_a_flipped_request_byte_is_refused_wherever_it_is():
    """Header, any recipient entry (even one for another node: the body's AAD covers all), body, tag."""
    nodes = [keypair() for _ in range(2)]
    request, _ = seal_request([pk for _, pk in nodes], b"hello")
    for where in range(len(request)):
        bad = bytearray(request)
        bad[where] ^= 0x01
        with pytest.raises(SealedMessageError):
            open_request(nodes[0][0], bytes(bad))


def test_a_recipient_list_altered_is_refused():
    nodes = [keypair() for _ in range(3)]
    request, _ = seal_request([pk for _, pk in nodes], b"hello")
    entries = [request[HDR.size + i * RECIPIENT_LEN:HDR.size + (i + 1) * RECIPIENT_LEN] for i in range(3)]
    body = request[HDR.size + 3 * RECIPIENT_LEN:]
    hdr2 = request[:HDR.size - 2] + struct.pack(">H", 2)
    for altered in (hdr2 + entries[0] + entries[1] + body,                               # one removed
                    request[:HDR.size] + entries[1] + entries[0] + entries[2] + body):   # reordered
        with pytest.raises(SealedMessageError):
            open_request(nodes[0][0], altered)


def test_a_request_for_other_keys_is_refused_by_name():
    _, pk = keypair()
    other, _ = keypair()
    request, _ = seal_request([pk], b"hello")
    with pytest.raises(SealedMessageError, match="other node keys"):
        open_request(other, request)
    with pytest.raises(SealedMessageError, match="too short"):
        open_request(other, request[:5])
    with pytest.raises(SealedMessageError, match="too short for its recipient list"):
        open_request(other, request[:HDR.size + RECIPIENT_LEN])
    version_1 = b"\x01" + request[1:]
    with pytest.raises(SealedMessageError, match="version 1"):
        open_request(other, version_1)


def test_a_flipped_response_byte_is_refused_wherever_it_is():
    _, stream, opener = exchange()
    assert copy.deepcopy(opener).open_all(stream) == b"onetwothree"
    for where in range(len(stream)):
        bad = bytearray(stream)
        bad[where] ^= 0x80
        with pytest.raises(SealedMessageError):
            copy.deepcopy(opener).open_all(bytes(bad))  # an unused opener copies cleanly (no cipher yet)


def test_reordered_dropped_truncated_and_extended_streams_are_refused():
    _, stream, opener = exchange((b"a", b"b", b"c", b""))
    nonce, fs = frames(stream)

    def opened(data):
        return copy.deepcopy(opener).open_all(data)

    assert opened(stream) == b"abc"
    with pytest.raises(SealedMessageError, match="reordered"):
        opened(nonce + fs[1] + fs[0] + fs[2] + fs[3])
    with pytest.raises(SealedMessageError):
        opened(nonce + fs[0] + fs[2] + fs[3])  # a chunk dropped
    with pytest.raises(SealedMessageError, match="truncated"):
        opened(nonce + fs[0] + fs[1] + fs[2])  # cut before the final chunk
    with pytest.raises(SealedMessageError, match="truncated"):
        opened(stream[:-3])  # cut inside a frame
    with pytest.raises(SealedMessageError, match="after its final"):
        opened(stream + fs[3])
    final_flag_cleared = bytearray(fs[3])
    final_flag_cleared[0] = 0
    with pytest.raises(SealedMessageError):
        opened(nonce + fs[0] + fs[1] + fs[2] + bytes(final_flag_cleared))


def test_a_response_cannot_be_replayed_to_another_request():
    _, stream, _ = exchange()
    _, _, other_opener = exchange()
    with pytest.raises(SealedMessageError):
        other_opener.open_all(stream)


def test_a_replayed_request_gets_fresh_response_keys():
    """The node picks the response nonce, so the same request opened twice is answered under two keys."""
    sk, pk = keypair()
    request, opener = seal_request([pk], b"hello")
    first, second = open_request(sk, request)[1].final(b"same"), open_request(sk, request)[1].final(b"same")
    assert first != second
    assert copy.deepcopy(opener).open_all(first) == copy.deepcopy(opener).open_all(second) == b"same"
