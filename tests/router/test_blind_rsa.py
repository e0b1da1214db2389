"""RSA blind signatures (RFC 9474, RSABSSA-SHA384-PSS-Randomized) against the RFC's test vector."""
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ccserve.router import blind_rsa
from ccserve.router.errors import IssuanceRefused, TokenRefused

VECTOR = json.loads((Path(__file__).parent / "vectors" / "rfc9474_sha384_pss_randomized.json").read_text())


def num(name: str) -> int:
    return int(VECTOR[name], 16)


def raw(name: str) -> bytes:
    return bytes.fromhex(VECTOR[name])


@pytest.fixture(scope="module")
def vector_key() -> rsa.RSAPrivateKey:
    p, q, d, e = num("p"), num("q"), num("d"), num("e")
    assert p * q == num("n")
    return rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                                 rsa.RSAPublicNumbers(e, num("n"))).private_key()


def test_rfc9474_vector_every_step(vector_key):
    public = vector_key.public_key()
    input_msg = raw("prepared_msg")
    assert input_msg == raw("msg_prefix") + raw("msg")
    assert blind_rsa.emsa_pss_encode(input_msg, num("n").bit_length() - 1, raw("salt")) == raw("encoded_msg")
    r = pow(num("inv"), -1, num("n"))           # the vector gives inv; the blind r is its inverse
    blinded, inv = blind_rsa._blind(public, input_msg, raw("salt"), r)
    assert blinded == raw("blinded_msg") and inv == num("inv")
    blind_sig = blind_rsa.BlindSigner(vector_key).blind_sign(blinded)
    assert blind_sig == raw("blind_sig")
    assert blind_rsa.finalize(public, input_msg, blind_sig, inv) == raw("sig")
    blind_rsa.verify(public, input_msg, raw("sig"))      # cryptography's RSASSA-PSS verification agrees


def test_random_roundtrip_and_refusals():
    key = rsa.generate_private_key(65537, 2048)
    public, signer = key.public_key(), blind_rsa.BlindSigner(key)
    input_msg = blind_rsa.prepare(b"any message")
    assert len(input_msg) == 32 + len(b"any message")
    blinded, inv = blind_rsa.blind(public, input_msg)
    blind_sig = signer.blind_sign(blinded)
    sig = blind_rsa.finalize(public, input_msg, blind_sig, inv)
    blind_rsa.verify(public, input_msg, sig)
    # the issuer's view is unrelated to the signature it enabled: blinding re-randomizes every request
    assert blinded != sig and blind_rsa.blind(public, input_msg)[0] != blinded
    with pytest.raises(TokenRefused):
        blind_rsa.verify(public, input_msg[:-1] + b"?", sig)
    with pytest.raises(IssuanceRefused):                   # a blind signature for another message
        blind_rsa.finalize(public, blind_rsa.prepare(b"other"), blind_sig, inv)
    with pytest.raises(IssuanceRefused):
        signer.blind_sign(blinded[:-1])
    with pytest.raises(IssuanceRefused):
        signer.blind_sign(b"\xff" * len(blinded))            # not below the modulus
