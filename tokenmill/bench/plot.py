"""PNG plots of a bench record: the throughput/latency trade-off, latency distributions, cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never try to open a window
    import matplotlib.pyplot as plt

    return plt


def _ok_values(level: dict[str, Any], key: str) -> list[float]:
    return [r[key] * 1000.0 for r in level["requests"] if r["ok"] and r.get(key) is not None]


def _throughput_latency(plt: Any, record: dict[str, Any], path: Path) -> None:
    levels = record["levels"]
    x = [lv["summary"]["output_tokens_per_s"] for lv in levels]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        for pct, style in (("p50", "o-"), ("p99", "s--")):
            y = [lv["summary"][key][pct] for lv in levels]
            points = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{title} {pct}")
        for lv, xi in zip(levels, x, strict=True):
            y50 = lv["summary"][key]["p50"]
            if y50 is not None:
                ax.annotate(lv["level"]["label"], (xi, y50), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(f"{title} vs throughput")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _distribution(plt: Any, record: dict[str, Any], key: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for lv in record["levels"]:
        values = sorted(_ok_values(lv, key))
        if values:
            frac = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, frac, where="post", label=lv["level"]["label"])
    ax.set_xlabel(f"{title} (ms)")
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_title(f"{title} distribution (CDF) per level")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cost(plt: Any, record: dict[str, Any], path: Path) -> None:
    points = [(lv["summary"]["output_tokens_per_s"],
               lv["cost"]["dollars_per_million_output_tokens"], lv["level"]["label"])
              for lv in record["levels"]
              if lv["cost"] and lv["cost"]["dollars_per_million_output_tokens"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("$ per 1M output tokens")
    ax.set_title(f"Cost per token vs load (${record['config']['price']['per_hour']:g}/hour)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(record: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the PNGs into ``out_dir``; returns their names (none when no request succeeded)."""
    if not any(lv["summary"]["num_ok"] for lv in record["levels"]):
        return []
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["throughput_latency.png", "ttft_distribution.png", "tpot_distribution.png"]
    _throughput_latency(plt, record, out_dir / names[0])
    _distribution(plt, record, "ttft_s", "TTFT", out_dir / names[1])
    _distribution(plt, record, "tpot_s", "TPOT", out_dir / names[2])
    if record["config"]["price"] is not None:
        names.append("cost.png")
        _cost(plt, record, out_dir / names[-1])
    return names
