"""C2SP signed notes and tlog checkpoints, against the spec's example and the Go reference implementation's."""
import pytest

from ccserve.attest import note
from ccserve.attest.checkpoint import Checkpoint, open_checkpoint
from ccserve.attest.errors import BadSignature, MalformedEvidence
from ccserve.attest.merkle import EMPTY_ROOT

# c2sp.org/signed-note, "Verifier keys" example
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = ("This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7"
             "Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n")
# golang.org/x/mod/sumdb/note documentation example
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (GO_TEXT + "\n\u2014 PeterNeumann "
           "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")


def test_spec_example_verifies():
    assert note.open_note(SPEC_NOTE, [note.Verifier.parse(SPEC_VKEY)]) == "This is an example message.\n"


def test_go_reference_key_signs_byte_for_byte():
    signer = note.Signer.parse(GO_SKEY)
    assert signer.verifier.encode() == GO_VKEY
    assert signer.encode() == GO_SKEY
    assert note.sign(GO_TEXT, signer) == GO_NOTE
    assert note.open_note(GO_NOTE, [note.Verifier.parse(GO_VKEY)]) == GO_TEXT


def test_altered_text_is_refused():
    with pytest.raises(BadSignature):
        note.open_note(GO_NOTE.replace("cryptography", "cryptographY"), [note.Verifier.parse(GO_VKEY)])


def test_signatures_by_unknown_keys_are_ignored_but_one_known_is_required():
    other = note.Signer.generate("witness.example/w1")
    cosigned = GO_NOTE + note.sign(GO_TEXT, other).split("\n\n")[-1]
    assert note.open_note(cosigned, [note.Verifier.parse(GO_VKEY)]) == GO_TEXT
    with pytest.raises(BadSignature, match="no signature by a pinned key"):
        note.open_note(GO_NOTE, [other.verifier])
    same_name = note.Signer.generate("PeterNeumann")  # same name, different key ID: ignored, so none verifies
    with pytest.raises(BadSignature):
        note.open_note(GO_NOTE, [same_name.verifier])


def test_malformed_keys_and_notes():
    with pytest.raises(ValueError, match="key ID"):
        note.Verifier.parse(GO_VKEY.replace("c74f20a3", "c74f20a4"))
    with pytest.raises(ValueError):
        note.Verifier.parse("name+deadbeef")
    with pytest.raises(ValueError):
        note.Signer.generate("has space")
    for bad in (GO_TEXT, GO_NOTE.rstrip("\n"), GO_NOTE.replace("\u2014 ", "- "),
                GO_NOTE.replace("\n\n", "\n\x01\n")):
        with pytest.raises(MalformedEvidence):
            note.open_note(bad, [note.Verifier.parse(GO_VKEY)])


def test_checkpoint_round_trip_and_origin_binding():
    signer = note.Signer.generate("example.test/log")
    cp = Checkpoint("example.test/log", 7, bytes(range(32)))
    signed = cp.sign(signer)
    root_b64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    assert signed.startswith(f"example.test/log\n7\n{root_b64}\n\n\u2014 example.test/log ")
    assert open_checkpoint(signed, signer.verifier) == cp
    with pytest.raises(ValueError, match="origin"):
        Checkpoint("example.test/other", 0, EMPTY_ROOT).sign(signer)
    with pytest.raises(BadSignature):
        open_checkpoint(signed.replace("\n7\n", "\n8\n"), signer.verifier)
    with pytest.raises(MalformedEvidence):
        Checkpoint.parse_text("example.test/log\n07\nAAAA\n")
