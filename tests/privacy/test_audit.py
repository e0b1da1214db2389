"""`ccserve audit` through the CLI: the text table and JSON, exit status 1 when pcc refuses and 2 for a bad
configuration; and serve / generate / bench refusing unsafe settings under pcc before loading anything."""
import json
from pathlib import Path

import pytest

from ccserve.cli import main
from ccserve.privacy.registry import FEATURES, NEUTRAL

MODEL = str(Path(__file__).parents[2] / "bench" / "models" / "llama3-8b")  # config.json only: nothing loads


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit status, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, content: str) -> str:
    path = tmp_path / "node.json"
    path.write_text(content)
    return str(path)


def test_text_table_of_a_safe_configuration(capsys):
    code, out, _ = run(["audit", "--model", MODEL], capsys)
    assert code == 0
    assert out.startswith(f"ccserve audit: policy pcc, model {MODEL}")
    assert "VERDICT  RULES FEATURE" in out
    assert "allowed  S     paged KV cache" in out and "zeroed" in out
    assert "off      SE    prefix caching" in out and "off      SE    public prefix cache" in out
    assert all(f.name in out for f in FEATURES)
    assert "Settings that touch no rule: model=" in out
    assert out.rstrip().endswith("Result: accepted under pcc.")


def test_refused_configuration_exits_1_with_the_reasons(capsys):
    code, out, _ = run(["audit", "--model", MODEL, "--load-format", "dummy", "--log-level", "debug"], capsys)
    assert code == 1
    assert "refused  EV    dummy weights" in out and "refused  P     debug logging" in out
    assert "- The pcc privacy policy refuses dummy weights (load_format='dummy')" in out
    assert "Result: the pcc policy refuses 2 feature(s)" in out


def test_open_reports_the_threat_and_exits_0(capsys):
    code, out, _ = run(["audit", "--model", MODEL, "--load-format", "dummy", "--privacy", "open"], capsys)
    assert code == 0
    assert "unsafe   EV    dummy weights" in out
    assert "The open privacy policy allows dummy weights" in out
    assert "Result: accepted under open, with 1 feature(s) that pcc would refuse." in out


def test_json_report(capsys):
    code, out, _ = run(["audit", "--model", MODEL, "--host", "0.0.0.0", "--json"], capsys)
    assert code == 1
    result = json.loads(out)
    assert result["policy"] == "pcc" and result["ok"] is False and result["model"] == MODEL
    rows = {row["name"]: row for row in result["features"]}
    assert list(rows) == [f.name for f in FEATURES]
    host = rows["plaintext HTTP beyond loopback"]
    assert host["verdict"] == "refused" and host["settings"] == {"host": "0.0.0.0"} and host["threatens"] == ["E"]
    assert host["allowed_under_pcc"] is False and host["alternative"].startswith("--host 127.0.0.1")
    assert rows["prefix caching"]["verdict"] == "off" and rows["disk offload"]["verdict"] == "absent"
    assert rows["paged KV cache"]["enabled"] is True
    assert set(result["neutral"]) == set(NEUTRAL) and result["neutral"]["privacy"]["value"] == "pcc"
    assert len(result["messages"]) == 1


def test_config_file_with_flags_over_it(tmp_path, capsys):
    path = write(tmp_path, json.dumps({"model": MODEL, "load_format": "dummy", "host": "0.0.0.0", "max_num_seqs": 64}))
    code, out, _ = run(["audit", "--config", path, "--json"], capsys)
    result = json.loads(out)
    assert code == 1 and {r["name"] for r in result["features"] if r["verdict"] == "refused"} == {
        "dummy weights", "plaintext HTTP beyond loopback"}
    assert next(r for r in result["features"] if r["name"] == "continuous batching scheduler")["settings"][
        "max_num_seqs"] == 64
    code, out, _ = run(["audit", "--config", path, "--load-format", "auto", "--host", "127.0.0.1"], capsys)
    assert code == 0


@pytest.mark.parametrize("content, words", [
    ('{"model": "x",', ["does not parse as JSON", "line 1"]),
    ('["model"]', ["must hold a JSON object"]),
    ('{"prefix_caching": true}', ["unknown setting 'prefix_caching'", "known settings:"]),
    ('{"max_num_seqs": "64"}', ["sets 'max_num_seqs' to '64'", "must be an integer"]),
    ('{"enforce_eager": 1}', ["'enforce_eager'", "must be true or false"]),
    ('{"max_num_seqs": true}', ["'max_num_seqs'", "must be an integer"]),
    ('{"log_level": "trace"}', ["log_level must be one of"]),
    (f'{{"model": "{MODEL}", "privacy": "strict"}}', ["privacy must be 'pcc'"]),
], ids=["syntax", "not-object", "unknown-key", "wrong-type", "bool", "bool-as-int", "bad-level", "bad-policy"])
def test_bad_config_file_exits_2_naming_the_problem(tmp_path, capsys, content, words):
    path = write(tmp_path, content)
    code, out, err = run(["audit", "--model", MODEL, "--config", path], capsys)
    assert code == 2 and not out
    assert err.startswith("ccserve audit: error: ") and all(w in err for w in words), err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run(["audit", "--model", MODEL, "--config", str(tmp_path / "absent.json")], capsys)
    assert code == 2 and "cannot be read: No such file or directory" in err


@pytest.mark.parametrize("argv, refused", [
    (["generate", "--model", MODEL, "--load-format", "dummy", "hi"], "dummy weights"),
    (["serve", "--model", MODEL, "--host", "0.0.0.0"], "plaintext HTTP beyond loopback"),
    (["serve", "--model", MODEL, "--log-level", "debug"], "debug logging"),
    (["bench", "--model", MODEL, "--privacy", "pcc", "--out", ""], "dummy weights"),
], ids=["generate", "serve-host", "serve-debug", "bench-pcc"])
def test_commands_refuse_unsafe_settings_under_pcc_before_loading(argv, refused, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and not out
    assert f"error: The pcc privacy policy refuses {refused}" in err


def test_unknown_policy_on_the_command_line(capsys):
    code, _, err = run(["audit", "--model", MODEL, "--privacy", "strict"], capsys)
    assert code == 2 and "privacy must be 'pcc' (the default) or 'open', got 'strict'" in err
