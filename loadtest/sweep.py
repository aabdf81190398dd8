"""`python -m dspark_serve.loadtest sweep`: each server configuration over a concurrency grid, with plots.

For every configuration: start it on a free loopback port, wait for its
health URL, send warm-up requests, then for each concurrency of the grid run
the closed-loop load generator over the same prompts, scraping /metrics
before and after the point (tau, verification budget, acceptance per
position); stop it. One JSON per sweep, a Markdown table, and PNG plots:
throughput vs tokens/s per user (paper Fig. 7), mean verification budget per
request vs concurrency (Fig. 8), latency CDFs; each plot overlays all
configurations.

    python -m dspark_serve.loadtest sweep \\
        --config-name off --server-args "--speculative-config '{\\"method\\": \\"none\\"}'" \\
        --config-name dspark --server-args "--speculative-config '{\\"method\\": \\"dspark\\", \\"model\\": \\"DIR\\"}'" \\
        --peer transformers --dataset sharegpt --concurrency-grid 1,2,4,8,16,32

`--base-url URL` measures a server that is already running instead (a peer
started by hand); `python -m dspark_serve.loadtest plot A.json B.json` overlays sweeps.

`--rounds N` (N >= 2) measures on a noisy machine: every server is started
once and kept up, and each round runs the whole grid with the configurations
interleaved point by point (c=1: A, B, C; c=2: A, B, C; ...), so a slow
minute of the machine hits every configuration alike. A point reports the
round with the median output throughput, every round's numbers, and its
ratio to the `--baseline` configuration (default: the first) as the median
of the per-round ratios, each taken between points measured next to each other.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx

from . import peers as peers_mod
from . import report
from .cli import (add_endpoint_args, add_output_args, add_sla_args, add_workload_args, load_config, measure,
                  server_identity, sla_from_args, warm_up)
from .client import check_base_url
from .peers import ServerSpec
from .servers import ServerProcess
from .stats import fmt
from .workloads import build_workload

DEFAULT_GRID = "1,2,4,8,16,32"


class _NewConfig(argparse.Action):
    """--config-name NAME starts a configuration; --server-args / --server-command fill the last one."""

    def __call__(self, parser, namespace, value, option_string=None):
        configs = getattr(namespace, "configs", None) or []
        if self.dest == "config_name":
            configs.append({"name": value})
        elif self.dest == "peer":
            configs.append({"name": value, "peer": value})
        else:
            if not configs or {"server_args", "server_command", "peer"} & set(configs[-1]):
                configs.append({"name": f"config{len(configs) + 1}"})
            configs[-1][self.dest] = value
        namespace.configs = configs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dspark_serve.loadtest sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("configurations (repeat; each --config-name starts one)")
    g.add_argument("--config-name", action=_NewConfig, help="name of the next configuration")
    g.add_argument("--server-args", action=_NewConfig,
                   help="flags for `dspark serve` (host and port are set by the sweep), one string")
    g.add_argument("--server-command", action=_NewConfig,
                   help="any server command line instead, with {port} where the port goes")
    g.add_argument("--health-path", default="/health", help="readiness URL path of --server-command servers")
    g.add_argument("--peer", action=_NewConfig, choices=peers_mod.PEERS,
                   help="a peer server from loadtest/peers.py on the same model file")
    g.add_argument("--model-path", default=None,
                   help="model file or directory the peers load (default: the embedded SmolLM2 GGUF)")
    g.add_argument("--peer-threads", type=int, default=None, help="CPU threads of the peers (default: all cores)")
    g.add_argument("--peer-dtype", default=None, help="transformers' dtype (default: what ours picks on this CPU)")
    g.add_argument("--peer-args", default="",
                   help="extra flags appended to every peer's command line, one string (--peer-args=\"--no-repack\" for "
                        "llama-server where its AMX repacking crashes: docs/benchmarks/README.md)")
    g.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to get ready")
    g.add_argument("--log-dir", default=None, help="server logs (default: a new folder under /tmp)")
    add_endpoint_args(p, base_url_default=None)
    add_workload_args(p)
    g = p.add_argument_group("grid")
    g.add_argument("--concurrency-grid", default=DEFAULT_GRID, help=f"(default {DEFAULT_GRID})")
    g.add_argument("--num-requests", type=int, default=None,
                   help="requests per point (default: 4 x concurrency, at least 16)")
    g.add_argument("--max-duration", type=float, default=300.0, help="seconds per point at most (default 300)")
    g.add_argument("--request-rate", type=float, default=None,
                   help="open loop: requests arrive as a Poisson process at this rate (req/s) and each point's "
                        "concurrency is the cap on requests in flight (default: closed loop, c requests in flight)")
    g.add_argument("--warmup-requests", type=int, default=1, help="per configuration, before its first point")
    g.add_argument("--rounds", type=int, default=1,
                   help="measure the grid N times with the configurations interleaved point by point and all "
                        "servers kept up; a point reports its median round (default 1: one server at a time)")
    g.add_argument("--fresh-prompts", action="store_true",
                   help="every point (and round) sends requests of its own, none sent before: a server with a "
                        "prefix cache then meets each prompt once, as in serving (default: every point replays "
                        "the first requests of the workload)")
    g.add_argument("--baseline", default=None,
                   help="configuration the others are compared with, per round (default: the first)")
    add_sla_args(p)
    add_output_args(p)
    g.add_argument("--no-plots", dest="plots", action="store_false")
    p.set_defaults(configs=None)
    return p


def server_specs(args) -> list[ServerSpec]:
    specs = []
    for c in args.configs or []:
        if "peer" in c:
            spec = peers_mod.peer(c["peer"], args.model_path, args.peer_threads, args.peer_dtype)
            if args.peer_args:
                spec.argv += shlex.split(args.peer_args)
                spec.note += f" (extra flags: {args.peer_args})"
            specs.append(spec)
        elif "server_command" in c:
            specs.append(ServerSpec(c["name"], shlex.split(c["server_command"]), dict(peers_mod.OFFLINE_ENV),
                                    args.health_path))
        else:
            specs.append(peers_mod.dspark(c["name"], c.get("server_args", "")))
    return specs


def point_line(name: str, c: int, point: dict) -> str:
    s = point["summary"]
    spec = (point.get("server_metrics") or {}).get("spec_decode") or {}
    tau = f", tau {spec['tau']:.2f}, budget {spec['mean_verify_budget']:.2f}" if spec.get("tau") else ""
    if spec.get("drafted_steps") or spec.get("budget_plain_steps"):
        v = spec.get("budget_verdicts") or {}
        tau += (f", steps drafted {spec['drafted_steps']:.0f} / kept plain {spec['budget_plain_steps']:.0f}"
                f" ({spec.get('budget_forecast_steps') or 0:.0f} by the forecast; verdicts {v.get('paid', 0):.0f} paid,"
                f" {v.get('lost', 0):.0f} lost)")
    return (f"[{name}] c={c}: {s['requests_completed']} ok / {s['requests_failed']} failed, "
            f"{s['output_token_throughput']:.1f} tok/s, {fmt(s['tokens_per_s_per_user']['mean'])} tok/s/user, "
            f"TTFT p50 {fmt(s['ttft_s']['p50'], 1000)} ms{tau}")


def open_config(base_url: str, args, specs_all) -> tuple[dict, str]:
    """Identify the server and warm it up: (identity, model name)."""
    identity = asyncio.run(server_identity(base_url, _headers(args)))
    model = args.model or identity["model"]
    if model is None:
        raise RuntimeError(f"{base_url}: no model from /v1/models; give --model")
    warm_cfg = load_config(args, model, concurrency=1)
    asyncio.run(warm_up(warm_cfg, specs_all, args.warmup_requests))
    wait_compiled(base_url, args.startup_timeout)
    return identity, model


def wait_compiled(base_url: str, timeout: float) -> float:
    """Seconds until a dspark server's background compile is done (`dspark_compiling` 0; other
    servers have no such gauge): points measure the compiled step, not the eager one."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return time.monotonic() - t0
        m = re.search(r"^dspark_compiling (\S+)$", text, re.M)
        if m is None or float(m.group(1)) == 0:
            return time.monotonic() - t0
        time.sleep(2)
    raise RuntimeError(f"{base_url}: still compiling after {timeout:.0f}s")


def measure_point(name: str, args, model: str, specs_all, c: int, per_point, round_index: int = 0) -> dict:
    rate = getattr(args, "request_rate", None)
    cfg = load_config(args, model, concurrency=None if rate else c, request_rate=rate)
    if rate:
        cfg.max_concurrency = c
    point = asyncio.run(measure(point_specs(args, specs_all, c, per_point, round_index), cfg, sla_from_args(args),
                                args.save_itl))
    print(point_line(name, c, point), file=sys.stderr)
    return {"concurrency": c, **point}


def point_specs(args, specs_all, c: int, per_point, round_index: int = 0) -> list:
    """The requests of one point: the first per_point(c) of the workload, or with --fresh-prompts
    a slice of its own (after the warm-up ones), the same slice for every configuration."""
    if not getattr(args, "fresh_prompts", False):
        return specs_all[: per_point(c)]
    start = args.warmup_requests
    for r in range(round_index + 1):
        for g in args.grid:
            if (r, g) == (round_index, c):
                return specs_all[start: start + per_point(c)]
            start += per_point(g)
    raise ValueError(f"concurrency {c} is not in the grid")


def sweep_config(name: str, base_url: str, args, specs_all, grid: list[int], per_point) -> dict:
    identity, model = open_config(base_url, args, specs_all)
    return {"server": identity, "points": [measure_point(name, args, model, specs_all, c, per_point) for c in grid]}


def _throughput(point: dict) -> float:
    return float(point["summary"]["output_token_throughput"] or 0.0)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def request_speeds(point: dict) -> list[list]:
    """(tokens/s per user, output tokens) of a point's completed requests."""
    return [[q.get("tokens_per_s_per_user"), q.get("output_tokens")] for q in point.get("requests", []) if q.get("ok")]


def combine_rounds(rounds: list[dict], baseline_rounds: list[dict] | None) -> dict:
    """One point from its rounds: the round with the median output throughput (the lower middle one
    for an even count), every round's headline numbers, and the median per-round ratio to the baseline."""
    order = sorted(range(len(rounds)), key=lambda i: _throughput(rounds[i]))
    pick = order[(len(rounds) - 1) // 2]
    point = dict(rounds[pick])
    point["median_round"] = pick
    point["rounds"] = [{
        "output_token_throughput": _throughput(r),
        "tokens_per_s_per_user_mean": r["summary"]["tokens_per_s_per_user"]["mean"],
        "requests_completed": r["summary"]["requests_completed"],
        "tau": ((r.get("server_metrics") or {}).get("spec_decode") or {}).get("tau"),
        "duration_s": r["summary"].get("duration_s"),
        # per completed request: (tokens/s per user, output tokens), so goodput at any floor can be
        # computed for every round afterwards (loadtest/bench_sla.py)
        "requests": request_speeds(r),
    } for r in rounds]
    if baseline_rounds:
        ratios = [_throughput(r) / _throughput(b) for r, b in zip(rounds, baseline_rounds) if _throughput(b) > 0]
        user = [r["summary"]["tokens_per_s_per_user"]["mean"] / b["summary"]["tokens_per_s_per_user"]["mean"]
                for r, b in zip(rounds, baseline_rounds)
                if r["summary"]["tokens_per_s_per_user"]["mean"] and b["summary"]["tokens_per_s_per_user"]["mean"]]
        if ratios:
            point["vs_baseline"] = {"throughput_ratio": _median(ratios), "throughput_ratios": ratios,
                                    "tokens_per_s_per_user_ratio": _median(user) if user else None}
    return point


def sweep_interleaved(live: list[tuple[dict, str, argparse.Namespace, str]], args, specs_all, grid: list[int],
                      per_point, baseline: str) -> None:
    """`--rounds`: every live configuration measured at each point in turn, the grid `args.rounds` times.
    `live` holds (entry, name, args for its server, model); points land in each entry."""
    measured: dict[str, dict[int, list[dict]]] = {name: {} for _, name, _, _ in live}
    for r in range(args.rounds):
        for c in grid:
            for entry, name, a, model in live:
                if entry.get("error"):
                    continue
                try:
                    measured[name].setdefault(c, []).append(measure_point(f"{name} round {r + 1}", a, model,
                                                                           specs_all, c, per_point, r))
                except Exception as e:  # a server that died loses its later points, not the others'
                    entry["error"] = f"{type(e).__name__} in round {r + 1} at c={c}: {e}"
                    print(f"[{name}] FAILED: {entry['error']}", file=sys.stderr)
    base = measured.get(baseline, {})
    for entry, name, _, _ in live:
        entry["points"] = [combine_rounds(measured[name][c], base.get(c) if name != baseline else None)
                           for c in grid if measured[name].get(c)]
        entry["baseline"] = baseline


def _headers(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _engine(point: dict) -> dict:
    return (point.get("server_metrics") or {}).get("engine") or {}


def markdown(sweep: dict) -> str:
    sla = any(p["summary"].get("goodput") for c in sweep["configs"] for p in c.get("points", []))
    prefix = any(_engine(p).get("prefix_cache_queries") for c in sweep["configs"] for p in c.get("points", []))
    rounds = sweep.get("rounds", 1) > 1
    base = sweep.get("baseline")
    head = ("| config | concurrency | req/s | output tok/s | tok/s/user (mean) | TTFT p50 / p99 (ms) | "
            "TPOT p50 (ms) | E2E p99 (s) | tau | verify budget | failed |" + (" goodput tok/s |" if sla else "")
            + (" prefix cache hits |" if prefix else "")
            + (f" output tok/s, each round | x {base}: output tok/s, tok/s/user (medians of per-round ratios) |"
               if rounds else ""))
    lines = [f"# Sweep {sweep['name']}", "", f"`{sweep['command']}`", "",
             f"Workload: {sweep['workload']['dataset']}, {sweep['per_point']}. Machine: {sweep['machine']['cpu']}, "
             f"{sweep['machine']['cores']} cores. Commit {sweep['git']['commit']}"
             f"{' (dirty)' if sweep['git']['dirty'] else ''}."
             + (f" {sweep['rounds']} rounds, configurations interleaved point by point; each row is the round "
                f"with the median output tok/s." if rounds else ""), "", head,
             "|" + " --- |" * 2 + " ---: |" * (head.count("|") - 3)]
    for c in sweep["configs"]:
        if c.get("error"):
            lines.append(f"| {c['name']} | failed to start: {c['error'].splitlines()[0][:80]} |")
            continue
        for p in c["points"]:
            s = p["summary"]
            spec = (p.get("server_metrics") or {}).get("spec_decode") or {}
            row = [c["name"], str(p["concurrency"]), fmt(s["request_throughput"]), fmt(s["output_token_throughput"]),
                   fmt(s["tokens_per_s_per_user"]["mean"]),
                   f"{fmt(s['ttft_s']['p50'], 1000)} / {fmt(s['ttft_s']['p99'], 1000)}",
                   fmt(s["tpot_s"]["p50"], 1000), fmt(s["e2e_s"]["p99"]), fmt(spec.get("tau")),
                   fmt(spec.get("mean_verify_budget")), str(s["requests_failed"])]
            if sla:
                row.append(fmt((s.get("goodput") or {}).get("output_token_throughput")))
            if prefix:
                e = _engine(p)
                q = e.get("prefix_cache_queries") or 0
                row.append(f"{100 * (e.get('prefix_cache_hits') or 0) / q:.0f}%" if q else "-")
            if rounds:
                row.append(" / ".join(fmt(r["output_token_throughput"]) for r in p.get("rounds", [])))
                vs = p.get("vs_baseline") or {}
                row.append(f"{fmt(vs.get('throughput_ratio'))}, {fmt(vs.get('tokens_per_s_per_user_ratio'))}"
                           if vs else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def start_server(spec: ServerSpec, entry: dict, args, log_dir: Path) -> ServerProcess:
    if spec.prepare is not None:
        print(f"[{spec.name}] preparing", file=sys.stderr)
        spec.prepare()
    print(f"[{spec.name}] starting: {spec.display()}", file=sys.stderr)
    server = ServerProcess(spec, log_dir / f"{spec.name}.log")
    entry["log"] = str(server.log_path)
    try:
        entry["startup_s"] = server.wait_ready(args.startup_timeout)
    except Exception:
        entry["exit_code"] = server.stop()
        raise
    return server


def run_interleaved(specs: list[ServerSpec], sweep: dict, args, specs_all, grid, per_point, log_dir: Path,
                    path: Path) -> None:
    """`--rounds`: start every server, warm each up, interleave the points, stop them all."""
    names = [spec.name for spec in specs]
    baseline = args.baseline or names[0]
    if baseline not in names:
        raise SystemExit(f"--baseline {baseline!r}: not one of {', '.join(names)}")
    servers, live = [], []
    try:
        for spec in specs:
            entry = {"name": spec.name, "command": spec.display(), "note": spec.note}
            sweep["configs"].append(entry)
            try:
                server = start_server(spec, entry, args, log_dir)
                servers.append((entry, server))
                args_for = argparse.Namespace(**{**vars(args), "base_url": server.url,
                                                 "model": args.model or spec.model})
                identity, model = open_config(server.url, args_for, specs_all)
            except Exception as e:  # one broken configuration must not lose the others
                entry["error"] = f"{type(e).__name__}: {e}"
                print(f"[{spec.name}] FAILED: {entry['error']}", file=sys.stderr)
                continue
            entry["server"] = identity
            live.append((entry, spec.name, args_for, model))
        sweep_interleaved(live, args, specs_all, grid, per_point, baseline)
    finally:
        for entry, server in servers:
            entry["exit_code"] = server.stop()
    sweep["baseline"] = baseline
    report.write_json(path, sweep)


def sweep_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    grid = [int(x) for x in args.concurrency_grid.split(",") if x.strip()]
    if not grid or min(grid) < 1:
        raise SystemExit("--concurrency-grid: positive integers, e.g. 1,2,4,8")
    if args.rounds < 1:
        raise SystemExit("--rounds: at least 1")
    if args.rounds > 1 and args.base_url:
        raise SystemExit("--rounds interleaves servers the sweep starts; not with --base-url")
    if args.base_url:
        check_base_url(args.base_url, args.allow_remote)
        if args.configs and any(set(c) != {"name"} for c in args.configs):
            raise SystemExit("--base-url measures a running server: no --server-args/--server-command/--peer")
    specs = [] if args.base_url else server_specs(args)
    if not args.base_url and not specs:
        raise SystemExit("nothing to measure: give --config-name/--server-args, --peer, or --base-url")

    def per_point(c: int) -> int:
        return args.num_requests or max(16, 4 * c)

    args.grid = grid
    total = (args.warmup_requests + args.rounds * sum(per_point(c) for c in grid) if args.fresh_prompts
             else max(per_point(c) for c in grid))
    specs_all, workload = build_workload(args, total)
    name = args.name or f"sweep-{args.dataset}-{report.timestamp()}"
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix=f"loadtest-{name}-"))
    sweep = {
        "kind": "loadtest_sweep",
        "name": name,
        "command": report.command_line(["sweep", *argv]),
        "git": report.git_commit(),
        "machine": report.machine(),
        "workload": workload,
        "grid": grid,
        "per_point": (f"{args.num_requests} requests per point" if args.num_requests
                      else "max(16, 4 x concurrency) requests per point") + f", at most {args.max_duration:g} s"
                     + (", fresh requests at every point" if args.fresh_prompts else "")
                     + (f", Poisson arrivals at {args.request_rate:g} req/s (concurrency: the cap on requests in "
                        "flight)" if args.request_rate else ""),
        "request_rate": args.request_rate,
        "sla": sla_from_args(args).to_dict(),
        "log_dir": str(log_dir),
        "rounds": args.rounds,
        "configs": [],
    }
    out_dir = Path(args.result_dir)
    path = out_dir / f"{name}.json"
    if args.base_url:
        label = (args.configs or [{"name": "endpoint"}])[-1]["name"]
        entry = {"name": label, "command": None, "base_url": args.base_url}
        entry.update(sweep_config(label, args.base_url.rstrip("/"), args, specs_all, grid, per_point))
        sweep["configs"].append(entry)
    if args.rounds > 1:
        run_interleaved(specs, sweep, args, specs_all, grid, per_point, log_dir, path)
    else:
        for spec in specs:
            entry = {"name": spec.name, "command": spec.display(), "note": spec.note}
            server = None
            try:
                server = start_server(spec, entry, args, log_dir)
                args_for = argparse.Namespace(**{**vars(args), "base_url": server.url,
                                                 "model": args.model or spec.model})
                entry.update(sweep_config(spec.name, server.url, args_for, specs_all, grid, per_point))
            except Exception as e:  # one broken configuration must not lose the others
                entry["error"] = f"{type(e).__name__}: {e}"
                print(f"[{spec.name}] FAILED: {entry['error']}", file=sys.stderr)
            finally:
                if server is not None:
                    entry["exit_code"] = server.stop()
                entry.setdefault("exit_code", None)
            sweep["configs"].append(entry)
            report.write_json(path, sweep)  # after each configuration: an interrupted sweep keeps what it measured

    report.write_json(path, sweep)
    md = markdown(sweep)
    (out_dir / f"{name}.md").write_text(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    files = [path, out_dir / f"{name}.md"]
    if args.plots:
        from .plots import plot_sweep

        files += plot_sweep(sweep["configs"], out_dir / name, title=name)
    print(md)
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    ok = any(p["summary"]["requests_completed"] for c in sweep["configs"] for p in c.get("points", []))
    return 0 if ok else 1


def plot_main(argv: list[str]) -> int:
    """`python -m dspark_serve.loadtest plot A.json [B.json ...] --out PREFIX`: overlay the configurations of sweeps."""
    import json

    ap = argparse.ArgumentParser(prog="python -m dspark_serve.loadtest plot", description=plot_main.__doc__)
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--out", required=True, help="path prefix of the PNG files")
    args = ap.parse_args(argv)
    configs = []
    for f in args.sweeps:
        configs += [c for c in json.loads(Path(f).read_text())["configs"] if c.get("points")]
    from .plots import plot_sweep

    for f in plot_sweep(configs, Path(args.out), title=Path(args.out).name):
        print(f)
    return 0
