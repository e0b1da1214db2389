"""`ccserve log init | show | serve`, `ccserve release` and `ccserve client verify`, run as the CLI runs them."""
import argparse
import json
import os
import stat
import subprocess
import sys

import pytest

from ccserve.attest.commands import add_commands
from ccserve.attest.identity import NodeIdentity
from ccserve.attest.log_http import build_log_app
from ccserve.attest.measure import measure, measurement_config
from ccserve.attest.tlog import TransparencyLog
from ccserve.config import EngineConfig, ServerOptions
from tests.attest.live import make_model_dir, node_app, serve


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ccserve")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_init_release_show_and_verify(tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    key = tmp_path / "secret" / "log.key"
    key.parent.mkdir()
    run(["log", "init", "--dir", str(tmp_path / "log"), "--origin", "example.test/releases", "--key-out", str(key)])
    vkey = capsys.readouterr().out.split("out of band): ")[1].strip()
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and key.read_text().startswith("PRIVATE+KEY+example.test/")
    assert not any("PRIVATE" in p.read_text() for p in (tmp_path / "log").rglob("*") if p.is_file())
    with pytest.raises(ValueError, match="refusing to overwrite"):
        run(["log", "init", "--dir", str(tmp_path / "log2"), "--origin", "x.test/l", "--key-out", str(key)])

    prefixes = tmp_path / "prefixes.json"
    prefixes.write_text(json.dumps(["You are a helpful assistant."]))
    run(["release", "--model", str(model), "--dry-run"])
    dry = json.loads(capsys.readouterr().out)
    assert TransparencyLog(tmp_path / "log").size == 0
    run(["release", "--model", str(model), "--public-prefix-file", str(prefixes), "--log",
         str(tmp_path / "log"), "--log-key", str(key)])
    out = capsys.readouterr().out
    assert "appended as entry 0" in out and "example.test/releases\n1\n" in out
    with pytest.raises(ValueError, match="already in the log"):
        run(["release", "--model", str(model), "--public-prefix-file", str(prefixes), "--log",
             str(tmp_path / "log"), "--log-key", str(key)])

    # The node measures the same way the release did: the same flags give the same log entry.
    config = measurement_config(EngineConfig(model=str(model), public_prefixes=["You are a helpful assistant."]),
                                ServerOptions())
    identity = NodeIdentity(measure(config, model, progress=False))
    log = TransparencyLog(tmp_path / "log")
    assert log.index_of(identity.measurement.leaf_hash) == 0
    assert identity.measurement.record()["config"] != dry["config"]  # the public prefix is measured
    assert json.loads(log.config(identity.measurement.config)) == config  # and published, by digest

    run(["log", "show", "--dir", str(tmp_path / "log"), "--entries", "--vkey", vkey])
    assert "1 entries" in capsys.readouterr().out

    node, log_server = serve(node_app(identity)), serve(build_log_app(tmp_path / "log"))
    try:
        common = ["--log-url", log_server.url, "--log-key", vkey, "--state-dir", str(tmp_path / "client")]
        run(["client", "verify", node.url, "--json", *common])
        result = json.loads(capsys.readouterr().out)
        assert result["verified"] and result["root"] == "software" and result["log_index"] == 0
        with pytest.raises(SystemExit) as exit_:
            run(["client", "verify", node.url, "--require-hardware", *common])
        assert exit_.value.code == 1 and "REFUSED (HardwareRequired)" in capsys.readouterr().err
    finally:
        node.stop()
        log_server.stop()


def test_log_show_refuses_an_altered_log(tmp_path, capsys):
    run(["log", "init", "--dir", str(tmp_path / "log"), "--origin", "example.test/l", "--key-out",
         str(tmp_path / "k")])
    other = tmp_path / "other"
    run(["log", "init", "--dir", str(other), "--origin", "example.test/l", "--key-out", str(tmp_path / "k2")])
    (tmp_path / "log" / "checkpoint").write_text((other / "checkpoint").read_text())
    with pytest.raises(SystemExit):
        run(["log", "show", "--dir", str(tmp_path / "log")])
    assert "REFUSED (BadSignature)" in capsys.readouterr().err


def test_log_serve_runs_as_a_process(tmp_path):
    """`ccserve log serve` in its own process answers the checkpoint (the command a deployment runs)."""
    import socket
    import time

    import httpx
    run(["log", "init", "--dir", str(tmp_path / "log"), "--origin", "example.test/l", "--key-out",
         str(tmp_path / "k")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import argparse, sys; from ccserve.attest.commands import add_commands; p = argparse.ArgumentParser(); "
            "add_commands(p.add_subparsers(dest='c')); a = p.parse_args(sys.argv[1:]); a.func(a)")
    proc = subprocess.Popen([sys.executable, "-c", code, "log", "serve", "--dir", str(tmp_path / "log"), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/checkpoint")
                break
            except httpx.ConnectError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("ccserve log serve did not start")
                time.sleep(0.1)
        assert r.status_code == 200 and r.text.startswith("example.test/l\n0\n")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
