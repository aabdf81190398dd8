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
                   help="auto: bfloat16 on GPUs; on a CPU bfloat16 where a matmul probe measures it >= 1.25x faster than "
                        "float32, else float32 (measured once per machine and kept in the cache directory; "
                        "DSPARK_CPU_DTYPE overrides)")
    g.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8"],
                   help="weight-only packed linears on a CPU: auto keeps the checkpoint's quantization (a GGUF's 4-bit "
                        "tensors -> int4, 8-bit -> int8; float checkpoints stay dense), int4/int8 pack every projection "
                        "and the output head, none reads dense weights (docs/benchmarks/quantization.md)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget of one step (prefill chunks + decodes)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the model's)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache pool size, bytes or with a unit (2GiB); default 1GiB on CPU, 85%% of free GPU memory")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV and drafter context of cached prompt blocks (system prompts, earlier turns, "
                        "the n choices of a request); --no-enable-prefix-caching recomputes every prompt")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="never torch.compile the decode step (by default its graphs compile in the background "
                        "after start-up while the server serves eagerly: docs/benchmarks/compile.md)")
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: the physical cores this process may use, within its affinity mask and cgroup CPU quota)")
    g.add_argument("--speculative-config", type=parse_json_dict, default=None,
                   help='JSON, e.g. {"method": "dspark", "model": PATH, "num_speculative_tokens": 7, '
                        '"verification": "scheduled"}; see README')
    g.add_argument("--cost-table", default=None,
                   help="SPS(B) cost table JSON to load, or to write after profiling (default: in the cache dir)")
    g.add_argument("--sla-min-tokens-per-s", type=float, default=0.0, metavar="TOKENS_PER_S",
                   help="speed floor of every request (output tokens/s after its first token; 0: none): the "
                        "load-aware scheduler weighs requests below it more in the plan and keeps new requests "
                        "waiting while admitting them would push the per-user speed below; a request sets its own with "
                        "min_tokens_per_s (0 relaxes it). docs/scheduler.md")
    g.add_argument("--record-acceptance", default=None,
                   help="append every verification round (confidence logits, verified, accepted) to this JSONL")


def default_speculative_config(model: str | None, speculative_config: dict | None) -> dict | None:
    """With the embedded default model, serve with the embedded drafter (when this install has
    one): with no --speculative-config, or one that sets dspark options without a "model";
    `{"method": "none"}` turns speculation off."""
    if model is not None:
        return speculative_config
    from dspark_serve.models.loader import default_drafter_path

    path = default_drafter_path()
    if speculative_config is None:
        return {"method": "dspark", "model": path} if path else None
    if speculative_config.get("method", "dspark") == "dspark" and not speculative_config.get("model") and path:
        return {**speculative_config, "method": "dspark", "model": path}  # dspark settings, embedded drafter
    return speculative_config


def engine_config_from_args(args: argparse.Namespace):
    from dspark_serve.engine import EngineConfig

    args.speculative_config = default_speculative_config(args.model, args.speculative_config)
    return EngineConfig(
        model=args.model, dtype=args.dtype, quantization=args.quantization, device=args.device, seed=args.seed,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory, num_threads=args.num_threads,
        speculative_config=args.speculative_config, cost_table=args.cost_table,
        record_acceptance=args.record_acceptance, enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager, sla_min_tokens_per_s=args.sla_min_tokens_per_s,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Offline generation: chat with the model from the command line, no server."""
    from dspark_serve.engine import LLM, SamplingParams

    llm = LLM.from_config(engine_config_from_args(args))
    prompts = args.prompt or ["Write a short poem about speculative decoding."]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sample_seed)
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    for p, o in zip(prompts, outs):
        print(f"### {p}\n{o.outputs[0].text}\n[{len(o.outputs[0].token_ids)} tokens, finish_reason={o.outputs[0].finish_reason}]\n")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Build the cost table SPS(B) offline (what `dspark serve` would profile at start-up) and save it."""
    from dspark_serve.engine import LLMEngine

    cfg = engine_config_from_args(args)
    if not (cfg.speculative_config or {}).get("model"):
        print("dspark profile needs --speculative-config with a drafter: SPS(B) includes its cost", file=sys.stderr)
        return 2
    table = LLMEngine(cfg).cost_table
    if table is None:
        print("this verification policy uses no cost table", file=sys.stderr)
        return 2
    for b, sps in sorted(table.points.items()):
        print(f"B={int(b):5d}  SPS={sps:9.2f} steps/s  ({1000.0 / sps:8.2f} ms)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit STS temperatures from a --record-acceptance log (or by serving the held-out prompts of
    a gen-data dataset with the drafter) and write calibration.json."""
    if args.data or args.drafter:
        if not (args.data and args.drafter) or args.input:
            print("calibrate takes either a --record-acceptance log, or --drafter DIR with --data DIR", file=sys.stderr)
            return 2
        from dspark_serve.training.evaluate import calibrate_drafter

        res = calibrate_drafter(args.drafter, args.data, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                                model=args.model, num_threads=args.num_threads)
        print(json.dumps(res))
        return 0
    if not args.input:
        print("calibrate needs a --record-acceptance log, or --drafter with --data", file=sys.stderr)
        return 2

    from dspark_serve.engine.acceptance_log import read_rounds
    from dspark_serve.scheduler import STSCalibrator

    rounds = read_rounds(args.input)  # context lookup's rounds have no drafter confidences to fit
    if not len(rounds.verified):
        print(f"{args.input} holds no verification rounds", file=sys.stderr)
        return 2
    cal = STSCalibrator().fit(rounds.logits, rounds.accepted, rounds.verified)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.input)), "calibration.json")
    cal.to_json(out)
    print(f"{len(rounds.verified)} rounds, gamma {rounds.gamma}: temperatures {[round(t, 3) for t in cal.temperatures]} -> {out}")
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

    prof = sub.add_parser("profile", help="profile the cost table SPS(B) of this machine and save it")
    add_engine_args(prof)
    prof.set_defaults(func=cmd_profile)

    cal = sub.add_parser("calibrate", help="fit drafter confidence temperatures (STS) from a --record-acceptance log")
    cal.add_argument("input", nargs="?", help="JSONL written by --record-acceptance")
    cal.add_argument("--drafter", default=None, help="drafter directory: calibrate by serving the held-out prompts of --data")
    cal.add_argument("--data", default=None, help="dspark gen-data directories, comma-separated (their validation split)")
    cal.add_argument("--model", default=None, help="the target (default: the embedded model)")
    cal.add_argument("--num-prompts", type=int, default=64)
    cal.add_argument("--max-tokens", type=int, default=128)
    cal.add_argument("--num-threads", type=int, default=None)
    cal.add_argument("--output", default=None, help="calibration.json path (default: beside the input)")
    cal.set_defaults(func=cmd_calibrate)

    from dspark_serve.training.cli import add_training_parsers

    add_training_parsers(sub)

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
