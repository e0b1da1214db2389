"""`ccserve serve | generate | bench | audit | release | log | client | relay | router | issuer`: the command line, a thin layer over EngineConfig and the engine.

Every command that runs the engine goes through engine_config(), which applies the privacy policy before
anything is loaded. `bench` defaults to dummy weights, so it runs under the `open` policy unless told otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from ccserve.config import LOG_LEVELS, EngineConfig, ServerOptions
from ccserve.privacy.policy import enforce


# Shorter spellings the docs use; the field's own flag works too.
FLAG_ALIASES = {"gpu_weight_budget_gb": ("--gpu-weight-budget",)}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, so the CLI can never drift from the config."""
    parser.add_argument("--model", default=None,
                        help="HF-format model directory (default: the bundled SmolLM2-135M-Instruct)")
    for f in fields(EngineConfig):
        if f.name in ("model", "extra"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "lora_adapters":
            parser.add_argument("--lora", dest="lora_adapters", nargs="+", action=LoraPairs, metavar="NAME=DIR",
                                default=None, help="LoRA adapters (PEFT directories), each served as model NAME")
        elif f.name == "public_prefixes":
            parser.add_argument("--public-prefix-file", dest="public_prefixes", action=PublicPrefixFile,
                                metavar="FILE", default=None,
                                help="operator-declared public prompt prefixes (system prompts), cached at start and "
                                "measured with the release: a JSON list of texts, {\"system\": text} chat system "
                                "messages or token id lists, or a text file "
                                "that is one prefix (repeatable; docs/privacy.md)")
        elif f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None)
        else:
            kind = {"int | None": int, "int": int, "float": float, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, *FLAG_ALIASES.get(f.name, ()), type=kind, default=None)


class LoraPairs(argparse.Action):
    """`--lora NAME=DIR ...` as the dict EngineConfig.lora_adapters takes."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        pairs = dict(getattr(namespace, self.dest) or {})
        for value in values:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                parser.error(f"--lora takes NAME=DIR pairs (the adapter's name and its PEFT directory), got {value!r}")
            if name in pairs:
                parser.error(f"--lora names adapter {name!r} twice")
            pairs[name] = path
        setattr(namespace, self.dest, pairs)


class PublicPrefixFile(argparse.Action):
    """`--public-prefix-file FILE` (repeatable) as the list EngineConfig.public_prefixes takes: a `.json` file is a
    list of prefixes (texts, {"system": text} or token id lists), any other file is one text prefix, exactly as
    written."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        try:
            with open(value, encoding="utf-8") as f:
                text = f.read()
            prefixes = json.loads(text) if value.endswith(".json") else [text]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            parser.error(f"--public-prefix-file {value!r} cannot be read: {exc}")
        if not isinstance(prefixes, list):
            parser.error(f"--public-prefix-file {value!r}: a .json file must hold a list of prefixes")
        setattr(namespace, self.dest, list(getattr(namespace, self.dest) or []) + prefixes)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's flags. No argparse defaults: ServerOptions holds them, so that `audit` can tell a
    flag given from a value its config file sets."""
    d = ServerOptions()
    parser.add_argument("--host", default=None, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=int, default=None, help=f"(default {d.port})")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-queue", type=int, default=None,
                        help=f"waiting requests before answering 429 (default {d.max_queue})")
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS, help=f"(default {d.log_level})")
    parser.add_argument("--attest", action="store_true", default=None,
                        help="prove what this node runs (GET /attestation) and open sealed requests; under the pcc "
                        "policy only sealed requests are accepted (docs/attest.md)")
    parser.add_argument("--router", default=None, help="with --attest: register with the `ccserve router` at this "
                        "URL (signed reports every 5 s)")
    parser.add_argument("--capacity", type=int, default=None, help="with --router: the capacity advertised to the "
                        "router (default: --max-num-seqs)")
    parser.add_argument("--advertise-url", default=None, help="with --router: the URL the router reaches this node "
                        "at (default http://HOST:PORT as bound)")


def engine_flags_given(args: argparse.Namespace) -> dict:
    """The EngineConfig fields the command line set (flags left out stay None and take the defaults)."""
    return {f.name: getattr(args, f.name) for f in fields(EngineConfig)
            if f.name != "extra" and getattr(args, f.name, None) is not None}


def effective_config(args: argparse.Namespace, base: dict | None = None) -> EngineConfig:
    """The EngineConfig of the flags given, over `base` (settings from an audit config file), over the
    defaults; the bundled model when neither names one."""
    given = {**(base or {}), **engine_flags_given(args)}
    if "model" not in given:
        from ccserve.models.default import default_model_dir
        given["model"] = str(default_model_dir())
    return EngineConfig(**given)


def server_options(args: argparse.Namespace, base: dict | None = None) -> ServerOptions:
    """The server's options: flags given, over `base` (from an audit config file), over the defaults."""
    given = {f.name: getattr(args, f.name) for f in fields(ServerOptions) if getattr(args, f.name, None) is not None}
    return ServerOptions(**{**(base or {}), **given})


def engine_config(args: argparse.Namespace, server: ServerOptions | None = None) -> EngineConfig:
    """The config a command runs with, refused here, before anything is loaded, when the privacy policy
    forbids it (together with the options of the server in front of it, if any)."""
    config = effective_config(args)
    enforce(config, server)
    return config


def cmd_serve(args: argparse.Namespace) -> None:
    from ccserve.server.api import serve
    options = server_options(args)
    config = engine_config(args, options)
    if config.privacy == "pcc":
        from ccserve.privacy.hardening import harden_process, reexec_with_scrubbing_allocator
        reexec_with_scrubbing_allocator()
        harden_process()
    serve(config, options)


def cmd_generate(args: argparse.Namespace) -> None:
    from ccserve import LLM, SamplingParams
    config = engine_config(args)
    llm = LLM(**{f.name: getattr(config, f.name) for f in fields(config)})
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.sampling_seed)
    out = llm.generate([prompt], params)[0]
    print(out.text)


def cmd_bench(args: argparse.Namespace) -> None:
    from ccserve.bench.throughput import run
    config = engine_config(args)
    kwargs = {k: v for k, v in engine_flags_given(args).items() if k != "model"}
    result = run(config.model, args.workloads, args.out, repeats=args.repeats, **kwargs)
    print(json.dumps(result["results"]))


def cmd_audit(args: argparse.Namespace) -> None:
    from ccserve.privacy.audit import load_config_file, render_json, render_text, report
    engine, server = load_config_file(args.config) if args.config else ({}, {})
    result = report(effective_config(args, engine), server_options(args, server))
    print(render_json(result) if args.json else render_text(result))
    if not result["ok"]:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="one-off generation for a prompt")
    add_engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="offline throughput on named workloads (dummy weights and the open "
                           "privacy policy by default: pcc refuses dummy weights)")
    add_engine_args(bench)
    bench.add_argument("--workloads", nargs="+", default=["A-mixed", "B-pressure", "C-decode"])
    bench.add_argument("--repeats", type=int, default=1)
    bench.add_argument("--out", default="bench/results", help="directory for the JSON result")
    bench.set_defaults(func=cmd_bench, load_format="dummy", privacy="open")

    audit = sub.add_parser("audit", help="which enabled optimizations threaten which PCC rule; exit status 1 "
                           "when the privacy policy refuses the configuration")
    add_engine_args(audit)
    add_server_args(audit)
    audit.add_argument("--config", default=None, help="JSON file of engine and server settings (flags override it)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(func=cmd_audit)

    from ccserve.attest.commands import add_commands as add_attest_commands
    from ccserve.router.commands import add_commands as add_router_commands
    add_attest_commands(sub)
    add_router_commands(sub)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:
        print(f"ccserve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
