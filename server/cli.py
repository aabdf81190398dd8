"""`dspark` command line: engine flags shared by every subcommand (vLLM's names)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_bytes(value: str | int | None) -> int | None:
    """'2GiB', '512MiB', '1.5G', '1000000' -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*", str(value), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (try 2GiB or 512MiB)")
    num = float(m.group(1))
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(num * scale)


def parse_json_dict(value: str | dict | None) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        d = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return d


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPUs and CPUs with native bf16, else float32")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget of one step (prefill chunks + decodes)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache pool size, bytes or with a unit (2GiB); default 1GiB on CPU, 85%% of free GPU memory")
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    g.add_argument("--speculative-config", type=parse_json_dict, default=None,
                   help='JSON, e.g. {"method": "dspark", "model": PATH, "num_speculative_tokens": 7}')


def engine_config_from_args(args: argparse.Namespace):
    from engine import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory, num_threads=args.num_threads,
        speculative_config=args.speculative_config,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Offline generation: chat with the model from the command line, no server."""
    from engine import LLM, SamplingParams

    llm = LLM.from_config(engine_config_from_args(args))
    prompts = args.prompt or ["Write a short poem about speculative decoding."]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sample_seed)
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    for p, o in zip(prompts, outs):
        print(f"### {p}\n{o.outputs[0].text}\n[{len(o.outputs[0].token_ids)} tokens, finish_reason={o.outputs[0].finish_reason}]\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="dspark-serve: DSpark speculative decoding inference server")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate offline from prompts (no server)")
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="*", help="user messages, one conversation each")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--sample-seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    try:
        from .serve import add_serve_parser
    except ImportError:
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
