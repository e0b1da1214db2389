"""`ccserve relay | router | issuer`: the three services of the oblivious path, as CLI subcommands.

Wire into ccserve/cli.py with `add_commands(sub)` on its subparsers; each subcommand sets `func`. Standalone:
`python -m ccserve.router relay --gateway URL`. Configuration errors raise ValueError with a sentence saying
what to do (cli.main prints it and exits 2).

    ccserve issuer --credentials FILE                                  token issuer     (default port 8083)
    ccserve router --issuer URL --log-url URL --log-key KEY            gateway + router (default port 8082)
    ccserve relay  --gateway URL                                       relay            (default port 8081)
"""
from __future__ import annotations

import argparse
import sys


def add_commands(subparsers) -> None:
    relay = subparsers.add_parser("relay", help="OHTTP relay: forwards encapsulated requests to the gateway, "
                                  "strips every client header, logs nothing per request")
    relay.add_argument("--gateway", required=True, help="base URL of the gateway (`ccserve router`)")
    _listen_args(relay, 8081)
    relay.add_argument("--max-request-bytes", type=int, default=8 << 20)
    relay.set_defaults(func=cmd_relay)

    router = subparsers.add_parser("router", help="OHTTP gateway + non-targetable router: decrypts, spends the "
                                   "anonymous token, forwards to a node drawn in proportion to capacity")
    router.add_argument("--issuer", required=True, help="base URL of the token issuer (`ccserve issuer`); its "
                        "key is fetched at start and again when tokens name a new one")
    router.add_argument("--log-url", default=None, help="base URL of the transparency log (`ccserve log serve`): "
                        "a node is routed to only once its evidence names a release in this log")
    router.add_argument("--log-key", default=None, help="the log's verifier key (name+keyid+base64), pinned out of "
                        "band, as clients pin it")
    router.add_argument("--evidence-max-age", type=float, default=60.0,
                        help="seconds a node's evidence may be old when it registers (default 60)")
    router.add_argument("--privacy", choices=("pcc", "open"), default="pcc",
                        help="the privacy policy: pcc (default) refuses --insecure-accept-unattested-nodes")
    router.add_argument("--insecure-accept-unattested-nodes", action="store_true",
                        help="development only, refused under --privacy pcc: route to any node whose report "
                        "signature verifies, without checking its evidence")
    router.add_argument("--max-node-capacity", type=int, default=1000,
                        help="cap on the capacity a node may advertise (bounds what a node gains by inflating it)")
    router.add_argument("--report-ttl", type=float, default=30.0,
                        help="seconds a node stays healthy after its last report")
    router.add_argument("--max-request-bytes", type=int, default=8 << 20)
    _listen_args(router, 8082)
    router.set_defaults(func=cmd_router)

    issuer = subparsers.add_parser("issuer", help="anonymous token issuer: RSA blind signatures (RFC 9474) for "
                                   "clients with a credential")
    issuer.add_argument("--credentials", required=True, help="file of accepted client credentials, one per line "
                        "(raw, or sha256:<hex digest>); clients send `Authorization: Bearer <credential>`")
    issuer.add_argument("--key-bits", type=int, default=2048, choices=(2048, 3072, 4096))
    issuer.add_argument("--quota", type=int, default=1000, help="tokens per credential per window")
    issuer.add_argument("--window", type=float, default=3600.0, help="quota window in seconds")
    _listen_args(issuer, 8083)
    issuer.set_defaults(func=cmd_issuer)


def _listen_args(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=port, help=f"(default {port}; 0 picks a free one)")


def _read(load, path: str):
    """load(path), with a missing or unreadable file reported as the configuration error it is."""
    try:
        return load(path)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def cmd_relay(args: argparse.Namespace) -> None:
    from ccserve.router import relay
    from ccserve.router.serve import run
    _, app = relay.build(args.gateway, args.max_request_bytes)
    run(app, args.host, args.port, "relay")


UNATTESTED_REFUSED = (
    "The pcc privacy policy refuses --insecure-accept-unattested-nodes: it breaks verifiable transparency (V) and "
    "enforceable guarantees (E), because requests would reach nodes whose software nobody checked against the "
    "transparency log. Safe alternative: --log-url URL --log-key KEY (the router verifies every node's evidence); "
    "or --privacy open, for development, which gives up that guarantee.")


def attestor_of(args: argparse.Namespace, http):
    """The router's attestation check, as the flags and the privacy policy allow it."""
    from ccserve.router.attestation import AcceptUnattested, EvidenceAttestor
    from ccserve.router.serve import log
    if args.insecure_accept_unattested_nodes:
        if args.privacy == "pcc":
            raise ValueError(UNATTESTED_REFUSED)
        if args.log_url or args.log_key:
            raise ValueError("give either --log-url/--log-key or --insecure-accept-unattested-nodes, not both")
        log("router", "WARNING: routing to unattested nodes (--insecure-accept-unattested-nodes, --privacy open)")
        return AcceptUnattested()
    if not (args.log_url and args.log_key):
        raise ValueError("the router routes only to attested nodes: give --log-url URL and --log-key KEY of the "
                         "transparency log their releases are in (`ccserve log serve`, `ccserve log init` printed "
                         "the key)")
    if args.evidence_max_age <= 0:
        raise ValueError("--evidence-max-age must be > 0 seconds")
    return EvidenceAttestor(args.log_url, args.log_key, http, max_age=args.evidence_max_age)


def cmd_router(args: argparse.Namespace) -> None:
    import httpx

    from ccserve.router import gateway
    from ccserve.router.serve import run
    if args.max_node_capacity < 1 or args.report_ttl <= 0:
        raise ValueError("--max-node-capacity must be >= 1 and --report-ttl > 0")
    with httpx.Client(timeout=30) as log_http:
        _, app = gateway.build(args.issuer, attestor_of(args, log_http), max_node_capacity=args.max_node_capacity,
                               report_ttl=args.report_ttl, max_request_bytes=args.max_request_bytes)
        run(app, args.host, args.port, "router")


def cmd_issuer(args: argparse.Namespace) -> None:
    from ccserve.router.issuer import Issuer, issuer_app, load_credentials
    from ccserve.router.serve import run
    issuer = Issuer.generate(_read(load_credentials, args.credentials), args.key_bits, quota=args.quota,
                             window_s=args.window)
    run(issuer_app(issuer), args.host, args.port, "issuer")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ccserve.router", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:
        print(f"ccserve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
