"""The two PNGs of a result, the way the Pensieve paper shows them (needs matplotlib: the
`bench` extra)."""

from __future__ import annotations

from pathlib import Path

from .metrics import curve, load_key, load_text

COLORS = {"stateful": "tab:blue", "stateless": "tab:orange", "hf": "tab:green",
          "remote": "tab:purple"}


def plot(result: dict, prefix: str) -> list[str]:
    """Two PNGs the way the Pensieve paper shows them: normalized latency against throughput
    (one curve per policy) and TTFT against turn index (a panel per rate)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in runs.items():
        for ax, metric in zip(axes, ("p90", "mean")):
            pts = curve(points, metric)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name,
                    color=COLORS.get(name))
    for ax, metric in zip(axes, ("p90", "mean")):
        _label(ax, "throughput (requests/s)", f"{metric} normalized latency (s / output token)")
    files.append(_save(plt, fig, result, f"{prefix}_latency.png"))

    loads = list(dict.fromkeys(load_key(p) for pts in runs.values() for p in pts))
    fig, axes = plt.subplots(1, len(loads), figsize=(4.2 * len(loads), 3.8), squeeze=False)
    for ax, load in zip(axes[0], loads):
        for name, points in runs.items():
            for p in points:
                if load_key(p) != load:
                    continue
                rows = [r for r in p["ttft_by_turn"] if r["n"] >= 3]
                ax.plot([r["turn"] + 1 for r in rows], [r["mean"] for r in rows], "o-",
                        label=name, color=COLORS.get(name))
        ax.set_title(load_text(*load))
        _label(ax, "turn index", "mean TTFT (s)")
    files.append(_save(plt, fig, result, f"{prefix}_ttft.png"))
    return files


def _label(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def _save(plt, fig, result: dict, path: str) -> str:
    fig.suptitle(_title(result))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(result: dict) -> str:
    w = result["workload"]
    return (f"{Path(result['model']).name} on {result['device']}: {w['name']} x{w['conversations']}"
            f" (scale {result['args']['scale']}), think {w['think_time_s']:g} s")
