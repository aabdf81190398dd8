"""`python -m dspark_serve.loadtest`: load an OpenAI-compatible endpoint and write one result file per run.

    python -m dspark_serve.loadtest --dataset sharegpt --concurrency 8 --num-requests 200
    python -m dspark_serve.loadtest --dataset gsm8k --request-rate 2 --max-duration 120
    python -m dspark_serve.loadtest sweep --config-name off --server-args "--speculative-config '{\"method\": \"none\"}'"

See docs/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from pathlib import Path

import httpx

from . import report
from .client import build_payload, check_base_url, discover_model, get_json, get_text, send_request
from .runner import LoadConfig, run_load
from .server_metrics import summarize_scrapes
from .stats import SLA, markdown_table, summarize
from .workloads import build_workload


def add_endpoint_args(p: argparse.ArgumentParser, base_url_default: str | None = "http://127.0.0.1:8000") -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default=base_url_default,
                   help=f"server root, without /v1 (default {base_url_default})")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow a base URL that is not a loopback address (default: refuse)")
    g.add_argument("--api-key", default=os.environ.get("LOADTEST_API_KEY"),
                   help="sent as `Authorization: Bearer KEY` (default $LOADTEST_API_KEY)")
    g.add_argument("--model", default=None, help="model name in requests (default: the first of /v1/models)")
    g.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions (default) or /v1/completions")
    g.add_argument("--no-stream", dest="stream", action="store_false",
                   help="non-streaming requests (then TTFT = e2e and there are no inter-token latencies)")
    g.add_argument("--no-usage", dest="include_usage", action="store_false",
                   help="do not ask for stream_options.include_usage (output tokens are then counted chunks)")
    g.add_argument("--temperature", type=float, default=0.0, help="(default 0: greedy)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos=true so every request runs to max_tokens (vLLM/dspark extension; "
                        "`transformers serve` rejects unknown fields)")
    g.add_argument("--extra-body", type=json.loads, default=None, help="JSON object merged into every request")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", default="synthetic",
                   help="synthetic (default), sharegpt, sharegpt-multiturn (conversations replayed turn by turn), "
                        "sharegpt-system-prompt (ShareGPT questions behind one shared system prompt), or a JSONL "
                        "set of ../shared/eval_datasets by name (gsm8k, mbpp, humaneval, math500, aime24, arena-hard-v2)")
    g.add_argument("--dataset-path", default=None,
                   help="file to read instead of the default (ShareGPT JSON or a {\"turns\": [...]} JSONL)")
    g.add_argument("--input-len", type=int, default=128, help="synthetic: words per prompt (default 128)")
    g.add_argument("--system-prompt-words", type=int, default=300,
                   help="sharegpt-system-prompt: words of the system prompt every request shares (default 300)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens of each request (default: synthetic 128, JSONL 256, ShareGPT the first "
                        "gpt turn's length; for ShareGPT a given value caps that length)")
    g.add_argument("--tokenizer", default="auto",
                   help="ShareGPT lengths: auto (the embedded model's), approx (4 chars/token), an HF "
                        "directory or a .gguf file")
    g.add_argument("--max-input-len", type=int, default=1024, help="ShareGPT: longest prompt kept, tokens")
    g.add_argument("--max-total-len", type=int, default=2048,
                   help="ShareGPT: longest prompt + reference answer kept, tokens")
    g.add_argument("--seed", type=int, default=0, help="prompt choice and Poisson arrivals (default 0)")


def add_sla_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("goodput SLA")
    g.add_argument("--sla-min-tokens-per-s-per-user", type=float, default=None,
                   help="a request counts toward goodput if its decode speed (1/TPOT) is at least this")
    g.add_argument("--sla-max-ttft", type=float, default=None, help="... and its TTFT at most this many seconds")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--result-dir", default=str(report.RESULTS_DIR),
                   help="where result files go (default docs/benchmarks)")
    g.add_argument("--name", default=None, help="file name stem (default: derived from the run and the time)")
    g.add_argument("--markdown", default=None, help="also write the Markdown table to this file")
    g.add_argument("--save-itl", action="store_true", help="keep every inter-token latency in the JSON")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dspark_serve.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_endpoint_args(p)
    add_workload_args(p)
    g = p.add_argument_group("load (closed loop by default; --request-rate for open loop)")
    g.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: this many requests in flight at all times (default 1)")
    g.add_argument("--request-rate", type=float, default=None,
                   help="open loop: Poisson arrivals at this many requests/s (inf: all at once)")
    g.add_argument("--max-concurrency", type=int, default=None, help="open loop: most requests in flight")
    g.add_argument("--num-requests", type=int, default=200, help="requests to send at most (default 200)")
    g.add_argument("--max-duration", type=float, default=600.0,
                   help="seconds after which the run stops, cutting off requests in flight (default 600)")
    g.add_argument("--warmup-requests", type=int, default=0, help="requests sent (one at a time) before measuring")
    add_sla_args(p)
    add_output_args(p)
    return p


def load_config(args, model: str, concurrency: int | None = None, request_rate: float | None = None) -> LoadConfig:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return LoadConfig(
        base_url=args.base_url.rstrip("/"), model=model, endpoint=args.endpoint, stream=args.stream,
        include_usage=args.include_usage, temperature=args.temperature, ignore_eos=args.ignore_eos,
        extra_body=args.extra_body, concurrency=concurrency, request_rate=request_rate,
        max_concurrency=getattr(args, "max_concurrency", None), max_duration=args.max_duration,
        request_timeout=args.request_timeout, seed=args.seed, progress=args.progress, headers=headers,
    )


def sla_from_args(args) -> SLA:
    return SLA(args.sla_min_tokens_per_s_per_user, args.sla_max_ttft)


async def server_identity(base_url: str, headers: dict) -> dict:
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as c:
        return {"base_url": base_url, "version": await get_json(c, "/version"), "model": await discover_model(c)}


async def scrape(base_url: str) -> str | None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        return await get_text(c, "/metrics")


async def warm_up(cfg: LoadConfig, specs, n: int) -> None:
    if n <= 0:
        return
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=cfg.headers,
                                 timeout=httpx.Timeout(cfg.request_timeout, connect=30.0)) as c:
        for i in range(n):
            s = specs[i % len(specs)]
            payload = build_payload(s, cfg.endpoint, cfg.model, cfg.stream, cfg.temperature, cfg.include_usage,
                                    cfg.ignore_eos, cfg.extra_body)
            await send_request(c, -1, s, payload, cfg.endpoint, 0.0)


async def measure(specs, cfg: LoadConfig, sla: SLA, save_itl: bool = False) -> dict:
    """One load point: scrape /metrics, run the load, scrape again; the point's result dict."""
    before = await scrape(cfg.base_url)
    outcome = await run_load(specs, cfg)
    after = await scrape(cfg.base_url)
    rate = cfg.request_rate
    return {
        "load": {
            "mode": cfg.mode, "concurrency": cfg.concurrency,
            "request_rate": ("inf" if rate is not None and math.isinf(rate) else rate),
            "max_concurrency": cfg.max_concurrency, "num_requests": len(specs), "max_duration_s": cfg.max_duration,
            "stopped_by": outcome.stopped_by, "max_in_flight": outcome.max_in_flight,
            "endpoint": cfg.endpoint, "stream": cfg.stream, "temperature": cfg.temperature,
            "ignore_eos": cfg.ignore_eos, "model": cfg.model,
        },
        "summary": summarize(outcome.results, outcome.duration, sla, outcome.incomplete),
        "server_metrics": summarize_scrapes(before, after),
        "requests": [r.to_dict(with_itl=save_itl) for r in outcome.results],
    }


def run_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_base_url(args.base_url, args.allow_remote)
    if args.concurrency is not None and args.request_rate is not None:
        raise SystemExit("give --concurrency (closed loop) or --request-rate (open loop), not both")
    if args.request_rate is None and args.max_concurrency is not None:
        raise SystemExit("--max-concurrency applies to the open loop (--request-rate)")
    concurrency = args.concurrency if args.request_rate is None else None
    if args.request_rate is None and concurrency is None:
        concurrency = 1
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    specs, workload = build_workload(args, args.num_requests)
    server = asyncio.run(server_identity(base_url, headers))
    model = args.model or server["model"]
    if model is None:
        raise SystemExit(f"{base_url}: no model from /v1/models (is the server up?); give --model")
    cfg = load_config(args, model, concurrency, args.request_rate)
    asyncio.run(warm_up(cfg, specs, args.warmup_requests))
    point = asyncio.run(measure(specs, cfg, sla_from_args(args), args.save_itl))

    load_desc = f"c{concurrency}" if concurrency else f"rate{args.request_rate:g}"
    name = args.name or f"loadtest-{args.dataset}-{load_desc}-{report.timestamp()}"
    result = {
        "kind": "loadtest_run",
        "command": report.command_line(argv),
        "git": report.git_commit(),
        "machine": report.machine(),
        "server": server,
        "workload": workload,
        **point,
    }
    title = f"{name}: {args.dataset}, {load_desc}, {server['base_url']} ({model})"
    md = markdown_table(point["summary"], title)
    spec = (point["server_metrics"] or {}).get("spec_decode")
    if spec and spec["rounds"]:
        md += (f"\nspeculation: tau {spec['tau']:.3f}, acceptance {spec['acceptance_rate']:.3f}, "
               f"mean verification budget {spec['mean_verify_budget']:.2f} per request per round\n")
    out = report.write_json(Path(args.result_dir) / f"{name}.json", result)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    print(md)
    print(f"result: {out}", file=sys.stderr)
    failed = point["summary"]["requests_completed"] == 0
    return 1 if failed else 0
