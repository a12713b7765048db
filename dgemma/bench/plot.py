"""Plots of benchmark reports: tokens/s against batch size and against denoising steps, per engine.

Needs matplotlib (``pip install "dgemma[bench]"``); rendered off-screen to a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dgemma.fileio import atomic_write

_STYLE = {"dgemma": ("tab:blue", "o"), "dgemma+graphs": ("tab:green", "D"), "transformers": ("tab:orange", "s"),
          "ar": ("tab:gray", "^")}


def plot_reports(reports: list[dict[str, Any]], path, title: str = "") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError('plotting needs matplotlib: pip install "dgemma[bench]"') from None
    runs = [r for rep in reports for r in rep["runs"]]
    fig, (by_batch, by_steps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for engine, (color, marker) in _STYLE.items():
        mine = [r for r in runs if r["engine"] == engine]
        if not mine:
            continue
        steps = sorted({r["steps"] for r in mine if r["engine"] != "ar"}) or [0]
        ref_steps = max(steps, key=lambda s: sum(r["steps"] == s for r in mine))
        pts = sorted((r["batch"], r["tokens_per_s"]) for r in mine if r["steps"] in (ref_steps, 0))
        if pts:
            by_batch.plot(*zip(*pts), color=color, marker=marker, label=engine)
        pts = sorted((r["steps"], r["tokens_per_s"]) for r in mine if r["batch"] == 1 and r["steps"])
        if len(pts) > 1 or (pts and engine != "ar"):
            by_steps.plot(*zip(*pts), color=color, marker=marker, label=engine)
        elif engine == "ar":
            ar = [r["tokens_per_s"] for r in mine if r["batch"] == 1]
            if ar:
                by_steps.axhline(ar[0], color=color, linestyle="--", label="ar (1 token / pass)")
    by_batch.set(xlabel="batch size", ylabel="tokens/s (all rows)", title="throughput vs batch")
    by_steps.set(xlabel="denoising steps per canvas (fixed)", ylabel="tokens/s", title="batch 1: speed vs steps")
    for ax in (by_batch, by_steps):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path
