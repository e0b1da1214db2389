"""OHTTP (RFC 9458) and chunked OHTTP against their worked examples, and every tampering refused."""
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ccserve.router import bhttp, ohttp, ohttp_chunked
from ccserve.router.errors import DecryptError, MalformedMessage, UnknownKey


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def x25519(hex_key: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(h(hex_key))


REQUEST = h("00034745540568747470730b6578616d706c652e636f6d012f")      # GET https://example.com/
RESPONSE = h("0140c8")                                                 # 200, nothing else

# RFC 9458 appendix A
A_KEY = x25519("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
A_CONFIG = h("01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003")
A_EPHEMERAL = x25519("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
A_ENC_REQUEST = h("""010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b4726374e469135906992e
    1268c594d2a10c695d858c40a026e7965e7d86b83dd440b2c0185204b4d63525""")
A_RESPONSE_NONCE = h("c789e7151fcba46158ca84b04464910d")
A_ENC_RESPONSE = h("c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd")

# draft-ietf-ohai-chunked-ohttp-05, appendix A
C_KEY = x25519("1c190d72acdbe4dbc69e680503bb781a932c70a12c8f3754434c67d8640d8698")
C_CONFIG = h("010020668eb21aace159803974a4c67f08b4152d29bed10735fd08f98ccdd6fe09570800080001000100010003")
C_EPHEMERAL = x25519("b26d565f3f875ed480d1abced3d665159650c99174fd0b124ac4bda0c64ae324")
C_ENC_REQUEST = h("""01002000010001 8811eb457e100811c40a0aa71340a1b81d804bb986f736f2f566a7199761a032
    1c2ad24942d4d692563012f2980c8fef437a336b9b2fc938ef77a5834f 1d2e33d8fd25577afe31bd1c79d094f76b6250ae6549b473ecd9
    50501311 001c6c1395d0ef7c1022297966307b8a7f""")
C_RESPONSE_NONCE = h("bcce7f4cb921309ba5d62edf1769ef09")
C_ENC_RESPONSE = h("""bcce7f4cb921309ba5d62edf1769ef09 1179bf1cc87fa0e2c02de4546945aa3d1e48
    12b348b5bd4c594c16b6170b07b475845d1f32 00ed9d8a796617a5b27265f4d73247f639""")

SUITES = ((ohttp.KDF_HKDF_SHA256, ohttp.AEAD_AES_128_GCM), (ohttp.KDF_HKDF_SHA256, ohttp.AEAD_CHACHA20_POLY1305))


def test_rfc9458_appendix_a():
    key = ohttp.GatewayKey(1, A_KEY, SUITES)
    assert key.config.encode() == A_CONFIG
    assert ohttp.KeyConfig.decode(A_CONFIG) == key.config
    enc_request, client = ohttp._encapsulate_request(key.config, REQUEST, ohttp.REQUEST_LABEL, A_EPHEMERAL)
    assert enc_request == A_ENC_REQUEST
    request, gateway = ohttp.decapsulate_request(key, A_ENC_REQUEST)
    assert request == REQUEST
    assert gateway._seal_response(RESPONSE, A_RESPONSE_NONCE) == A_ENC_RESPONSE
    assert client.open_response(A_ENC_RESPONSE) == RESPONSE


def test_chunked_draft_example():
    key = ohttp.GatewayKey(1, C_KEY, SUITES)
    assert key.config.encode() == C_CONFIG
    # the example seals 12 bytes, the other 13, then an empty final chunk
    enc_request, client = ohttp_chunked._encapsulate_request(key.config, [REQUEST[:12], REQUEST[12:], b""],
                                                             C_EPHEMERAL)
    assert enc_request == C_ENC_REQUEST
    request, sealer = ohttp_chunked.decapsulate_request(key, C_ENC_REQUEST)
    assert request == REQUEST
    produced = sealer._start(C_RESPONSE_NONCE) + sealer.seal(RESPONSE[:1]) + sealer.seal(RESPONSE[1:]) + \
        sealer.seal_final(b"")
    assert produced == C_ENC_RESPONSE
    opener = client.response_opener()
    chunks = [c for i in range(len(C_ENC_RESPONSE)) for c in opener.feed(C_ENC_RESPONSE[i:i + 1])]
    assert chunks == [RESPONSE[:1], RESPONSE[1:]] and opener.finish() == b""


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def test_any_altered_request_byte_is_refused():
    key = ohttp.GatewayKey(1, A_KEY, SUITES)
    for i in range(len(A_ENC_REQUEST)):
        with pytest.raises(DecryptError):         # UnknownKey is a DecryptError: header bytes name another key
            ohttp.decapsulate_request(key, flip(A_ENC_REQUEST, i))
    with pytest.raises(DecryptError):
        ohttp.decapsulate_request(key, A_ENC_REQUEST[:-1])


def test_any_altered_response_byte_is_refused():
    key = ohttp.GatewayKey(1, A_KEY, SUITES)
    _, client = ohttp._encapsulate_request(key.config, REQUEST, ohttp.REQUEST_LABEL, A_EPHEMERAL)
    for i in range(len(A_ENC_RESPONSE)):
        with pytest.raises(DecryptError):
            client.open_response(flip(A_ENC_RESPONSE, i))


def test_chunked_tampering_is_refused():
    key = ohttp.GatewayKey(1, C_KEY, SUITES)
    for i in range(7, len(C_ENC_REQUEST)):
        with pytest.raises(DecryptError):
            ohttp_chunked.decapsulate_request(key, flip(C_ENC_REQUEST, i))
    _, client = ohttp_chunked._encapsulate_request(key.config, [REQUEST[:12], REQUEST[12:], b""], C_EPHEMERAL)
    # dropping the final chunk: every non-final chunk opens, but the response never finishes
    without_final = C_ENC_RESPONSE[:-17]
    opener = client.response_opener()
    assert opener.feed(without_final) == [RESPONSE[:1], RESPONSE[1:]]
    with pytest.raises(DecryptError):
        opener.finish()
    # swapping the two non-final chunks: the chunk counter is in the nonce
    nonce, c1, c2, final = C_ENC_RESPONSE[:16], C_ENC_RESPONSE[16:34], C_ENC_RESPONSE[34:53], C_ENC_RESPONSE[53:]
    with pytest.raises(DecryptError):
        client.response_opener().feed(nonce + c2 + c1 + final)
    # re-marking a non-final chunk as final: the "final" AAD does not match
    opener = client.response_opener()
    with pytest.raises(DecryptError):
        opener.feed(nonce + b"\x00" + c1[1:])
        opener.finish()


def test_roundtrip_with_generated_keys_and_wrong_key():
    key = ohttp.GatewayKey.generate()
    config = ohttp.decode_key_configs(ohttp.encode_key_configs([key.config]))[0]
    body = bhttp.encode_request(bhttp.Request("POST", "/v1/chat/completions", content=bytes(range(256)) * 300))
    enc, client = ohttp.encapsulate_request(config, body)
    got, gateway = ohttp.decapsulate_request(key, enc)
    assert got == body
    assert client.open_response(gateway.seal_response(RESPONSE)) == RESPONSE
    other = ohttp.GatewayKey(key.key_id, X25519PrivateKey.generate())
    with pytest.raises(DecryptError):
        ohttp.decapsulate_request(other, enc)
    with pytest.raises(UnknownKey):
        ohttp.decapsulate_request(ohttp.GatewayKey((key.key_id + 1) % 256, X25519PrivateKey.generate()), enc)
    # big chunked requests are split into 16 KiB chunks and reassembled
    enc, client = ohttp_chunked.encapsulate_request(config, body)
    assert ohttp_chunked.decapsulate_request(key, enc)[0] == body


def test_streamed_response_in_random_pieces():
    key = ohttp.GatewayKey.generate()
    enc, client = ohttp_chunked.encapsulate_request(key.config, REQUEST)
    _, sealer = ohttp_chunked.decapsulate_request(key, enc)
    pieces = [bytes([i]) * (i + 1) for i in range(40)]
    wire = sealer.start() + b"".join(sealer.seal(p) for p in pieces) + sealer.seal_final(b"end")
    rng, opener, got = random.Random(3), client.response_opener(), []
    pos = 0
    while pos < len(wire):
        step = rng.randint(1, 60)
        got += opener.feed(wire[pos:pos + step])
        pos += step
    assert got == pieces and opener.finish() == b"end"


def test_key_config_list_with_an_error_is_refused_whole():
    good = ohttp.encode_key_configs([ohttp.KeyConfig.decode(A_CONFIG), ohttp.KeyConfig.decode(C_CONFIG)])
    assert len(ohttp.decode_key_configs(good)) == 2
    for bad in (good[:-1], good + b"\x00", b"", good[:3] + b"\x01" + good[4:]):
        with pytest.raises(MalformedMessage):
            ohttp.decode_key_configs(bad)


def test_garbage_only_ever_raises_decrypt_error():
    """Whatever arrives at the gateway, decapsulation fails with DecryptError (a plain 400), never anything
    that would escape as a 500 or a traceback."""
    key = ohttp.GatewayKey(1, A_KEY, SUITES)
    rng = random.Random(9)
    header = A_ENC_REQUEST[:7]
    for _ in range(300):
        body = header + rng.randbytes(rng.choice([0, 5, 31, 32, 33, 48, 49, 100]))
        if rng.random() < 0.2:
            body = header + bytes(32) + rng.randbytes(20)       # an all-zero (small-order) encapsulated key
        for decapsulate in (ohttp.decapsulate_request, ohttp_chunked.decapsulate_request):
            with pytest.raises(DecryptError):
                decapsulate(key, body)
