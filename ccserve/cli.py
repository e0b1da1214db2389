"""`ccserve serve | generate | bench`: the command line, a thin layer over EngineConfig and the engine."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from ccserve.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, so the CLI can never drift from the config."""
    parser.add_argument("--model", default=None,
                        help="HF-format model directory (default: the bundled SmolLM2-135M-Instruct)")
    for f in fields(EngineConfig):
        if f.name in ("model", "extra"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=None)
        else:
            kind = {"int | None": int, "int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    model = args.model
    if model is None:
        from ccserve.models.default import default_model_dir
        model = str(default_model_dir())
    given = {f.name: getattr(args, f.name) for f in fields(EngineConfig)
             if f.name not in ("model", "extra") and getattr(args, f.name, None) is not None}
    return EngineConfig(model=model, **given)


def cmd_serve(args: argparse.Namespace) -> None:
    from ccserve.server.api import serve
    serve(engine_config(args), host=args.host, port=args.port, served_model_name=args.served_model_name,
          max_queue=args.max_queue, log_level=args.log_level)


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
    kwargs = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("model", "extra")}
    kwargs = {k: v for k, v in kwargs.items() if getattr(args, k, None) is not None}
    kwargs.setdefault("load_format", "dummy")
    result = run(config.model, args.workloads, args.out, repeats=args.repeats, **kwargs)
    print(json.dumps(result["results"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-queue", type=int, default=1024, help="waiting requests before answering 429")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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

    bench = sub.add_parser("bench", help="offline throughput on named workloads (dummy weights by default)")
    add_engine_args(bench)
    bench.add_argument("--workloads", nargs="+", default=["A-mixed", "B-pressure", "C-decode"])
    bench.add_argument("--repeats", type=int, default=1)
    bench.add_argument("--out", default="bench/results", help="directory for the JSON result")
    bench.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:
        print(f"ccserve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
