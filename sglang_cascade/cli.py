"""`sglang-cascade`: `serve` over HTTP, or `generate` once in-process and report how speculation went.

The generate report is the quickest way to see Cascade at work on one prompt: how many tokens each
iteration produced, how often it speculated and which configurations the controller chose.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from sglang_cascade.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from sglang_cascade.server.launch import add_server_args, serve
from sglang_cascade.server.protocol import IncrementalDetokenizer
from sglang_cascade.target_digest import TargetMismatch


def spec_report(outs, elapsed_s: float) -> str:
    """A small table of speculative statistics over one request's StepOutputs."""
    iters = len(outs)
    tokens = sum(len(o.new_token_ids) for o in outs)
    labels = [str(o.meta.get("spec_config", "?")) for o in outs]
    speculating = sum(label != "plain" for label in labels)
    history = ", ".join(f"{label} x{len(list(run))}" for label, run in itertools.groupby(labels))
    last = outs[-1].meta if outs else {}
    rows = [
        ("iterations", f"{iters}"),
        ("tokens / iteration", f"{tokens / max(iters, 1):.2f}"),
        ("acceptance length", f"{float(last.get('spec_accept_length', 0.0)):.2f}"),
        ("iterations speculating", f"{speculating / max(iters, 1):.0%} ({speculating}/{iters})"),
        ("config history", history or "-"),
        ("tokens/s", f"{tokens / elapsed_s:.1f}" if elapsed_s > 0 else "-"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def generate(args, parser: argparse.ArgumentParser) -> int:
    try:
        cfg = EngineConfig.from_cli_args(args)
    except ValueError as e:
        parser.error(str(e))
    print(f"loading the engine (mode {cfg.mode}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        engine = Engine(cfg)
    except TargetMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    tok = engine.tokenizer
    if args.chat:
        if not getattr(tok, "chat_template", None):
            print("error: this model's tokenizer has no chat template; drop --chat", file=sys.stderr)
            return 2
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(args.prompt)
    req = GenerationRequest("cli", ids, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                       temperature=args.temperature))
    try:
        engine.validate(req)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine.add_request(req)
    detok, shown, outs = IncrementalDetokenizer(tok), 0, []
    t0 = time.perf_counter()
    while engine.has_work():
        for out in engine.step():
            outs.append(out)
            text = detok.add(out.new_token_ids)
            if out.finished:
                text = detok.flush()
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    elapsed = time.perf_counter() - t0
    print("\n")
    print(spec_report(outs, elapsed))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sglang-cascade", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = add_server_args(sub.add_parser(
        "serve", help="SGLang-compatible HTTP server (same as python -m sglang_cascade.server)"))
    gen = sub.add_parser("generate", help="generate once in-process and print speculative statistics")
    gen.add_argument("--prompt", required=True, help="prompt text (raw unless --chat)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    EngineConfig.add_cli_args(gen)
    args = parser.parse_args(argv)
    if args.command == "generate":
        sys.exit(generate(args, gen))
    serve(args, serve_parser)


if __name__ == "__main__":
    main()
