"""`ccserve release | log | client`: publish a release to the transparency log, run and inspect the log, verify a
node from the command line. `add_commands(subparsers)` adds them to the main parser (ccserve/cli.py).

The log's signing key is the only key that touches a disk here: `ccserve log init --key-out PATH` writes it
(mode 0600) where the operator says, and `ccserve release --log-key PATH` reads it. Keep it off the nodes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ccserve.cli import add_engine_args, add_server_args

    release = sub.add_parser("release", help="measure code + config + weights and append the measurement to the "
                             "transparency log")
    add_engine_args(release)
    add_server_args(release)
    release.add_argument("--config", default=None, help="JSON file of engine and server settings, as for `audit` "
                         "(flags override it)")
    release.add_argument("--log", required=False, default=None, help="the log directory (`ccserve log init`)")
    release.add_argument("--log-key", default=None, help="file holding the log's signing key")
    release.add_argument("--dry-run", action="store_true", help="print the measurement; append nothing")
    release.set_defaults(func=cmd_release)

    log = sub.add_parser("log", help="the transparency log: init, serve (read-only HTTP), show and verify")
    log_sub = log.add_subparsers(dest="log_command", required=True)
    init = log_sub.add_parser("init", help="create an empty log and its signing key")
    init.add_argument("--dir", required=True, help="directory for the log (release metadata only)")
    init.add_argument("--origin", required=True, help="the log's name, e.g. example.com/ccserve-releases")
    init.add_argument("--key-out", required=True, help="where to write the signing key (mode 0600; keep it "
                      "off the nodes)")
    init.set_defaults(func=cmd_log_init)
    serve = log_sub.add_parser("serve", help="serve the log read-only over HTTP")
    serve.add_argument("--dir", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8100, help="(default 8100; 0 picks a free one)")
    serve.set_defaults(func=cmd_log_serve)
    show = log_sub.add_parser("show", help="verify the whole log (signature, every entry hashed) and print it")
    show.add_argument("--dir", required=True)
    show.add_argument("--vkey", default=None, help="the verifier key to check against (default: the log's own)")
    show.add_argument("--entries", action="store_true", help="print every entry")
    show.set_defaults(func=cmd_log_show)

    client = sub.add_parser("client", help="the client SDK from the command line")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    verify = client_sub.add_parser("verify", help="verify a node: evidence, log inclusion, log consistency")
    verify.add_argument("url", help="the node's base URL")
    verify.add_argument("--log-url", required=True, help="the transparency log's base URL")
    verify.add_argument("--log-key", required=True, help="the log's verifier key (name+keyid+base64), pinned")
    verify.add_argument("--state-dir", default=str(Path("~/.ccserve-client").expanduser()),
                        help="where the last verified checkpoint is kept (default ~/.ccserve-client)")
    verify.add_argument("--require-hardware", action="store_true", help="refuse software-rooted evidence")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_client_verify)


def cmd_release(args: argparse.Namespace) -> None:
    from ccserve.attest.encoding import canonical_json
    from ccserve.attest.measure import measure, measurement_config
    from ccserve.attest.note import Signer
    from ccserve.attest.tlog import TransparencyLog
    from ccserve.cli import effective_config, server_options
    from ccserve.privacy.audit import load_config_file
    from ccserve.privacy.policy import enforce

    engine_base, server_base = load_config_file(args.config) if args.config else ({}, {})
    engine, server = effective_config(args, engine_base), server_options(args, server_base)
    enforce(engine, server)  # a release the node would refuse to start with is no release
    config = measurement_config(engine, server)
    measurement = measure(config, engine.model)
    print(json.dumps({"measurement": measurement.digest, **measurement.record()}, indent=1))
    if args.dry_run:
        return
    if not args.log or not args.log_key:
        raise ValueError("release needs --log DIR and --log-key FILE (or --dry-run)")
    log = TransparencyLog(args.log)
    index, checkpoint = log.append(measurement.entry(), Signer.parse(_read_key(args.log_key)), canonical_json(config))
    print(f"appended as entry {index}; new checkpoint:\n{checkpoint}", end="")


def cmd_log_init(args: argparse.Namespace) -> None:
    from ccserve.attest.note import Signer
    from ccserve.attest.tlog import TransparencyLog

    key_path = Path(args.key_out)
    if key_path.exists():
        raise ValueError(f"{key_path} exists; refusing to overwrite a signing key")
    signer = Signer.generate(args.origin)
    TransparencyLog.create(args.dir, signer)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(signer.encode() + "\n")
    print(f"log {args.origin} created in {args.dir}; signing key written to {key_path} (mode 0600)")
    print(f"verifier key (give it to clients, out of band): {signer.verifier.encode()}")


def cmd_log_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from ccserve.attest.log_http import build_log_app
    from ccserve.listen import bind, url_of
    app = build_log_app(args.dir)
    sock = bind(args.host, args.port)
    print(f"ccserve log: listening on {url_of(sock)}", flush=True)  # --port 0 picks a free port: this says which
    config = uvicorn.Config(app, host=args.host, port=sock.getsockname()[1], log_config=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def cmd_log_show(args: argparse.Namespace) -> None:
    from ccserve.attest.checkpoint import open_checkpoint
    from ccserve.attest.errors import VerificationError
    from ccserve.attest.note import Verifier
    from ccserve.attest.tlog import TransparencyLog

    log = TransparencyLog(args.dir)
    try:
        if args.vkey:
            open_checkpoint(log.signed_checkpoint(), Verifier.parse(args.vkey))
        checkpoint = log.verify()
    except VerificationError as exc:
        print(f"ccserve log show: REFUSED ({type(exc).__name__}): {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"log {checkpoint.origin}: {checkpoint.size} entries, root {checkpoint.root_hash.hex()} (verified)")
    print(log.signed_checkpoint(), end="")
    if args.entries:
        for i, entry in enumerate(log.entries(0, checkpoint.size)):
            print(f"{i}\t{entry.decode()}")


def cmd_client_verify(args: argparse.Namespace) -> None:
    from ccserve.attest.errors import VerificationError
    from ccserve.client.verify import verify_node

    try:
        node = verify_node(args.url, args.log_url, args.state_dir, log_key=args.log_key,
                           require_hardware=args.require_hardware)
    except VerificationError as exc:
        print(f"ccserve client verify: REFUSED ({type(exc).__name__}): {exc}", file=sys.stderr)
        sys.exit(1)
    result = {"url": node.url, "verified": True, "root": node.root, "hardware_verified": list(node.hardware_verified),
              "measurement": node.measurement.digest, "log_index": node.log_index,
              "log_size": node.checkpoint.size, "hpke_public_key": node.hpke_public_key.hex()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"verified {node.url}: measurement {node.measurement.digest} is entry {node.log_index} of "
              f"{node.checkpoint.origin} ({node.checkpoint.size} entries, consistent with this client's history)")
        print(f"root of trust: {node.root}" + (" (no hardware attestation: the node's claims are its own)"
                                               if node.root == "software" else ""))
        print(f"node HPKE key: {node.hpke_public_key.hex()}")


def _read_key(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"the log signing key {path!r} cannot be read: {exc.strerror}") from None
