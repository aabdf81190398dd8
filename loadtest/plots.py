"""PNG plots of a sweep; every plot overlays all configurations (one colour each)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _spec(point: dict) -> dict:
    return (point.get("server_metrics") or {}).get("spec_decode") or {}


def plot_frontier(configs: list[dict], path: Path, title: str) -> Path:
    """Output tokens/s of the server vs tokens/s each user sees, one point per concurrency (paper Fig. 7)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, c in zip(_colors(len(configs)), configs):
        pts = [(p["summary"]["tokens_per_s_per_user"]["mean"], p["summary"]["output_token_throughput"],
                p["concurrency"]) for p in c["points"] if p["summary"]["tokens_per_s_per_user"]["mean"]]
        if not pts:
            continue
        xs, ys, _ = zip(*pts)
        ax.plot(xs, ys, "o-", color=color, label=c["name"])
        for x, y, conc in pts:
            ax.annotate(str(conc), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens/s per user (mean of 1/TPOT)")
    ax.set_ylabel("output tokens/s (server)")
    ax.set_title(f"{title}: throughput vs per-user speed (labels: concurrency)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_verify_budget(configs: list[dict], path: Path, title: str) -> Path:
    """Mean verification budget per request per round (paper Fig. 8), the positions drafted per
    request per step (load-aware drafting), and tau, vs concurrency."""
    plt = _pyplot()
    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(15, 4))
    any_spec = False
    for color, c in zip(_colors(len(configs)), configs):
        pts = [(p["concurrency"], _spec(p).get("mean_verify_budget"), _spec(p).get("tau"),
                _spec(p).get("mean_drafted_positions")) for p in c["points"]]
        b = [(x, y) for x, y, _, _ in pts if y is not None]
        t = [(x, y) for x, _, y, _ in pts if y is not None]
        dp = [(x, y) for x, _, _, y in pts if y is not None]
        if b:
            a1.plot(*zip(*b), "o-", color=color, label=c["name"])
            any_spec = True
        if t:
            a2.plot(*zip(*t), "o-", color=color, label=c["name"])
        if dp:
            a3.plot(*zip(*dp), "o-", color=color, label=c["name"])
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    grid = sorted({p["concurrency"] for c in configs for p in c["points"]})
    for ax, label in ((a1, "mean verification budget per request per round"),
                      (a3, "positions drafted per request per step"), (a2, "tau (tokens per round)")):
        ax.set_xscale("log", base=2)
        if grid:
            ax.set_xticks(grid)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if not any_spec:
        a1.text(0.5, 0.5, "no speculative decoding metrics\n(speculation off, or a peer)", ha="center",
                va="center", transform=a1.transAxes, fontsize=9)
    fig.suptitle(f"{title}: verification budget vs load", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(values: list[float]):
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def plot_latency_cdfs(configs: list[dict], path: Path, title: str) -> Path:
    """CDFs of TTFT, TPOT and E2E per configuration and concurrency (darker = higher concurrency)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    metrics = (("ttft", "TTFT (s)"), ("tpot", "TPOT (s)"), ("e2e", "E2E latency (s)"))
    for color, c in zip(_colors(len(configs)), configs):
        n = len(c["points"])
        for j, p in enumerate(c["points"]):
            alpha = 0.3 + 0.7 * (j + 1) / n
            for ax, (key, _) in zip(axes, metrics):
                vals = [r[key] for r in p.get("requests", []) if r.get("ok") and r.get(key) is not None]
                if vals:
                    ax.step(*_cdf(vals), where="post", color=color, alpha=alpha, lw=1.2,
                            label=c["name"] if j == n - 1 else None)
    for ax, (_, label) in zip(axes, metrics):
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}: latency CDFs, one line per concurrency (darker = more concurrent)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(configs: list[dict], prefix: Path, title: str) -> list[Path]:
    configs = [c for c in configs if c.get("points")]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return [
        plot_frontier(configs, Path(f"{prefix}-frontier.png"), title),
        plot_verify_budget(configs, Path(f"{prefix}-verify-budget.png"), title),
        plot_latency_cdfs(configs, Path(f"{prefix}-latency-cdf.png"), title),
    ]
