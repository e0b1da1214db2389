"""Measurements are reproducible with standard tools and change with every byte they cover."""
import hashlib
import subprocess
from pathlib import Path

import pytest

import ccserve
from ccserve.attest import merkle
from ccserve.attest.errors import MalformedEvidence
from ccserve.attest.measure import Measurement, code_digest, measure, measurement_config, weights_digest
from ccserve.config import EngineConfig, ServerOptions
from tests.attest.live import make_model_dir


def test_code_digest_is_the_documented_shell_recipe():
    base = Path(ccserve.__file__).parent.parent
    shell = subprocess.run("find ccserve -name '*.py' | LC_ALL=C sort | xargs sha256sum | sha256sum",
                           shell=True, cwd=base, capture_output=True, text=True, check=True).stdout.split()[0]
    assert code_digest() == shell


def test_code_digest_changes_with_one_byte(tmp_path):
    pkg = tmp_path / "ccserve"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "m.py").write_text("y = 2\n")
    (pkg / "notes.txt").write_text("not code")
    before = code_digest(pkg)
    (pkg / "notes.txt").write_text("changed, still not code")
    assert code_digest(pkg) == before
    (pkg / "sub" / "m.py").write_text("y = 3\n")
    assert code_digest(pkg) != before


def test_weights_digest_is_a_merkle_root_of_sha256sum_lines(tmp_path):
    d = make_model_dir(tmp_path / "m", weights=b"w" * 1000)
    (d / ".cache").mkdir()
    (d / ".cache" / "junk").write_text("ignored")
    lines = [f"{hashlib.sha256((d / n).read_bytes()).hexdigest()}  {n}" for n in ("config.json", "model.safetensors")]
    assert weights_digest(d, progress=False) == merkle.root([merkle.leaf_hash(s.encode()) for s in lines]).hex()
    before = weights_digest(d, progress=False)
    (d / "model.safetensors").write_bytes(b"w" * 999 + b"x")
    assert weights_digest(d, progress=False) != before
    (d / "model.safetensors").write_bytes(b"w" * 1000)
    (d / "model.safetensors").rename(d / "model2.safetensors")
    assert weights_digest(d, progress=False) != before


def test_weights_of_a_missing_or_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        weights_digest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        weights_digest(tmp_path / "empty")


def test_measurement_config_leaves_out_machine_local_paths(tmp_path):
    a = make_model_dir(tmp_path / "a")
    b = make_model_dir(tmp_path / "b")
    ca = measurement_config(EngineConfig(model=str(a), public_prefixes=["You are helpful."]),
                            ServerOptions(port=8000))
    cb = measurement_config(EngineConfig(model=str(b), public_prefixes=["You are helpful."]),
                            ServerOptions(port=9000))
    assert ca == cb and "model" not in ca["settings"] and ca["settings"]["privacy"] == "pcc"
    assert measurement_config(EngineConfig(model=str(a), privacy="open")) != ca


def test_measurement_changes_with_the_public_prefixes(tmp_path):
    """The declared public prefixes are measured: a node that caches another prefix has another measurement."""
    model = make_model_dir(tmp_path / "m")
    digests = {measure(measurement_config(EngineConfig(model=str(model), public_prefixes=p)), model,
                       progress=False).config for p in ([], ["You are helpful."], ["You are helpful!"], [[1, 2, 3]])}
    assert len(digests) == 4
    config = measurement_config(EngineConfig(model=str(model), public_prefixes=["You are helpful."]))
    assert config["public_prefixes"] == ["You are helpful."] and "public_prefixes" not in config["settings"]


def test_measurement_record_round_trip_and_validation(tmp_path):
    m = measure({"settings": {}, "public_prefixes": []}, make_model_dir(tmp_path / "m"), progress=False)
    assert Measurement.from_record(m.record()) == m
    assert m.leaf_hash == merkle.leaf_hash(m.entry()) and m.digest == hashlib.sha256(m.entry()).hexdigest()
    for bad in ({**m.record(), "code": "00"}, {**m.record(), "extra": 1}, {**m.record(), "format": "v0"}, []):
        with pytest.raises(MalformedEvidence):
            Measurement.from_record(bad)
