"""The sealed envelope: round trips, and every tampering of request or response stream refused."""
import copy

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ccserve.attest.envelope import FRAME_HEAD, HDR_LEN, N_ENC, open_request, seal_request
from ccserve.attest.errors import SealedMessageError


def keypair():
    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def frames(stream: bytes) -> tuple[bytes, list[bytes]]:
    """(response nonce, frames) of a sealed response."""
    nonce, rest, out = stream[:16], stream[16:], []
    while rest:
        _, length = FRAME_HEAD.unpack_from(rest)
        out.append(rest[:FRAME_HEAD.size + length])
        rest = rest[FRAME_HEAD.size + length:]
    return nonce, out


def exchange(chunks=(b"one", b"two", b"three")):
    sk, pk = keypair()
    request, opener = seal_request(pk, b'{"prompt": "secret"}')
    body, sealer = open_request(sk, request)
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


def test_ciphertext_hides_the_content():
    _, pk = keypair()
    request, _ = seal_request(pk, b"a very secret prompt")
    assert b"secret" not in request
    _, stream, _ = exchange((b"a very secret answer",))
    assert b"secret" not in stream


@pytest.mark.parametrize("where", [0, HDR_LEN - 1, HDR_LEN, HDR_LEN + N_ENC, -1])
def test_a_flipped_request_byte_is_refused(where):
    sk, pk = keypair()
    request, _ = seal_request(pk, b"hello")
    bad = bytearray(request)
    bad[where] ^= 0x01
    with pytest.raises(SealedMessageError):
        open_request(sk, bytes(bad))


def test_a_request_for_another_key_is_refused_by_name():
    _, pk = keypair()
    other, _ = keypair()
    request, _ = seal_request(pk, b"hello")
    with pytest.raises(SealedMessageError, match="another node key"):
        open_request(other, request)
    with pytest.raises(SealedMessageError, match="too short"):
        open_request(other, request[:20])


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
