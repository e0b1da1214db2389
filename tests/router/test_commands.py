"""The relay/router/issuer subcommands: what cli.py wires in with add_commands(subparsers)."""
import argparse

import pytest

from ccserve.router.commands import add_commands, main


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ccserve")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_subcommands_parse_with_their_defaults():
    assert parse(["relay", "--gateway", "http://gw"]).port == 8081
    router = parse(["router", "--issuer", "http://iss", "--log-url", "http://log", "--log-key", "k"])
    assert (router.port, router.max_node_capacity, router.report_ttl) == (8082, 1000, 30.0)
    assert (router.privacy, router.evidence_max_age) == ("pcc", 60.0)
    assert parse(["issuer", "--credentials", "c.txt"]).key_bits == 2048
    with pytest.raises(SystemExit):
        parse(["issuer", "--credentials", "c.txt", "--key-bits", "1024"])


@pytest.mark.parametrize("argv, message", [
    (["router", "--issuer", "http://127.0.0.1:9"], "--log-url URL and --log-key KEY"),
    (["router", "--issuer", "http://127.0.0.1:9", "--log-url", "http://127.0.0.1:9"], "--log-key"),
    (["router", "--issuer", "http://127.0.0.1:9", "--log-url", "http://127.0.0.1:9", "--log-key", "bad"],
     "not name+keyid+base64"),
    (["router", "--issuer", "x", "--insecure-accept-unattested-nodes"],
     "The pcc privacy policy refuses --insecure-accept-unattested-nodes: it breaks verifiable transparency (V)"),
    (["router", "--issuer", "x", "--privacy", "open", "--log-url", "u", "--log-key", "k",
      "--insecure-accept-unattested-nodes"], "not both"),
    (["issuer", "--credentials", "/nonexistent"], "cannot read"),
])
def test_configuration_errors_say_what_to_do(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
