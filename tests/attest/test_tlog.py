"""The log directory: appends, checkpoints, proofs, concurrent readers, crash recovery, tamper detection."""
import json

import pytest

from ccserve.attest import merkle
from ccserve.attest.checkpoint import open_checkpoint
from ccserve.attest.errors import BadSignature
from ccserve.attest.note import Signer
from ccserve.attest.tlog import TransparencyLog
from tests.attest.live import make_log


def entry(i: int) -> bytes:
    return json.dumps({"release": i}).encode()


def test_append_signs_a_checkpoint_over_every_entry(tmp_path):
    log, signer = make_log(tmp_path / "log")
    assert log.checkpoint().size == 0 and log.checkpoint().root_hash == merkle.EMPTY_ROOT
    for i in range(5):
        index, signed = log.append(entry(i), signer)
        assert index == i
        cp = open_checkpoint(signed, signer.verifier)
        assert cp.size == i + 1
        assert cp.root_hash == merkle.root([merkle.leaf_hash(entry(j)) for j in range(i + 1)])
    assert log.verify().size == 5
    for i in range(5):
        merkle.verify_inclusion(i, 5, merkle.leaf_hash(entry(i)), log.inclusion_proof(i, 5), cp.root_hash)
    merkle.verify_consistency(2, 5, log.root(2), log.root(5), log.consistency_proof(2, 5))


def test_each_release_is_logged_once_and_only_with_the_log_key(tmp_path):
    log, signer = make_log(tmp_path / "log")
    log.append(entry(0), signer)
    with pytest.raises(ValueError, match="already in the log at index 0"):
        log.append(entry(0), signer)
    with pytest.raises(ValueError, match="not this log's key"):
        log.append(entry(1), Signer.generate(log.origin))
    with pytest.raises(ValueError, match="newline"):
        log.append(b"a\nb", signer)
    with pytest.raises(ValueError, match="already holds"):
        TransparencyLog.create(tmp_path / "log", signer)


def test_a_reader_picks_up_appends_from_another_process(tmp_path):
    writer, signer = make_log(tmp_path / "log")
    reader = TransparencyLog(tmp_path / "log")
    writer.append(entry(0), signer)
    writer.append(entry(1), signer)
    assert reader.size == 0
    reader.refresh()
    assert reader.size == 2 and reader.index_of(merkle.leaf_hash(entry(1))) == 1
    assert reader.checkpoint().size == 2


def test_entries_written_before_a_crash_are_signed_by_the_next_append(tmp_path):
    log, signer = make_log(tmp_path / "log")
    log.append(entry(0), signer)
    with open(tmp_path / "log" / "entries.jsonl", "ab") as f:  # appended, then the process died
        f.write(entry(1) + b"\n")
    assert TransparencyLog(tmp_path / "log").verify().size == 1  # the checkpoint still verifies
    _, signed = TransparencyLog(tmp_path / "log").append(entry(2), signer)
    assert open_checkpoint(signed, signer.verifier).size == 3


def test_verify_detects_an_altered_entry_and_a_foreign_checkpoint(tmp_path):
    log, signer = make_log(tmp_path / "log")
    for i in range(3):
        log.append(entry(i), signer)
    path = tmp_path / "log" / "entries.jsonl"
    path.write_bytes(path.read_bytes().replace(b'{"release": 1}', b'{"release": 9}'))
    with pytest.raises(ValueError, match="do not hash to the checkpoint"):
        TransparencyLog(tmp_path / "log").verify()
    other, other_signer = make_log(tmp_path / "other")
    (tmp_path / "log" / "checkpoint").write_text(other.signed_checkpoint())
    with pytest.raises(BadSignature):
        TransparencyLog(tmp_path / "log").verify()


def test_opening_a_directory_that_is_not_a_log(tmp_path):
    with pytest.raises(ValueError, match="ccserve log init"):
        TransparencyLog(tmp_path)
