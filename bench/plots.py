"""PNG plots of a run (matplotlib, Agg backend: no display needed).

* ``dropout_<dtype>.png``: effective GB/s vs n for each provider, one panel per mode, with the
  measured copy bandwidth of the same size as a dashed line;
* ``train_speedup.png``: speedup of each training variant over eager (same run), per case.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .dropout import MODES  # noqa: E402
from .env import versions_line  # noqa: E402
from .train import EAGER  # noqa: E402


def _title(meta: dict) -> str:
    return f"{meta['device']}\n{versions_line(meta)}, {meta['date']}"


def dropout_plot(rows: list, meta: dict, dtype: str, path: str) -> None:
    rows = [r for r in rows if r["section"] == "dropout" and r["dtype"] == dtype]
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != "copy"))
    fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 4.2), sharey=True)
    copy = sorted((r["numel"], r["gbps_eff"]) for r in rows if r["provider"] == "copy")
    for ax, mode in zip(axes, MODES):
        for provider in providers:
            mine = [r for r in rows if (r["provider"], r["mode"]) == (provider, mode)]
            points = sorted((r["numel"], r["gbps_eff"]) for r in mine)
            ax.plot(*zip(*points), marker="o", label=provider)
        ax.plot(*zip(*copy), linestyle="--", color="gray", label="copy (y.copy_(x))")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("elements n")
        ax.set_title(f"dropout {mode}, {dtype}, p={meta['p']}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("effective GB/s (minimal bytes / median time)")
    axes[-1].legend(fontsize="small")
    fig.suptitle(_title(meta), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_plot(rows: list, meta: dict, path: str) -> None:
    rows = [r for r in rows if r["section"] == "train" and r["provider"] != EAGER]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(2.2 * len(cases) + 2, 4.2))
    for i, variant in enumerate(variants):
        by_case = {r["case"]: r["speedup_vs_eager"] for r in rows if r["provider"] == variant}
        xs = [c + (i - (len(variants) - 1) / 2) * width for c in range(len(cases))]
        bars = ax.bar(xs, [by_case.get(c, 0.0) for c in cases], width, label=variant)
        ax.bar_label(bars, fmt="%.2fx", fontsize="small")
    ax.axhline(1.0, color="gray", linewidth=0.8, label="eager = 1")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("speedup vs eager (median step time)")
    ax.set_title("training step speedup", fontsize="medium")
    ax.legend(fontsize="small")
    fig.suptitle(_title(meta), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(result: dict, out_dir: str) -> list:
    """Every plot the run's rows allow; returns the paths written."""
    rows, meta = result["rows"], result["meta"]
    paths = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows if r["section"] == "dropout"):
        paths.append(os.path.join(out_dir, f"dropout_{dtype}.png"))
        dropout_plot(rows, meta, dtype, paths[-1])
    if any(r["section"] == "train" for r in rows):
        paths.append(os.path.join(out_dir, "train_speedup.png"))
        train_plot(rows, meta, paths[-1])
    return paths
