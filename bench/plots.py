"""PNG plots of a run (matplotlib, Agg backend: no display needed).

* ``dropout_<dtype>.png``: effective GB/s vs n for each provider, one panel per mode, with the
  measured copy bandwidth of the same size as a dashed line;
* ``ce_<dtype>.png``: the same for cross-entropy + sampling + gradient, vs the number of classes C;
* ``site_<dtype>.png``: the same for the site penalty, fwd and fwd+bwd;
* ``train_speedup.png``: speedup of each training variant over eager (same run), per case;
* ``train_reg_speedup.png``: the fused regularized step vs the plain-autograd one, and vs an eager
  dropout step of the same model, per case.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import ce, dropout, site_penalty  # noqa: E402
from .env import versions_line  # noqa: E402
from .train import EAGER, REG_FUSED  # noqa: E402


def _title(meta: dict) -> str:
    return f"{meta['device']}\n{versions_line(meta)}, {meta['date']}"


def op_plot(rows: list, meta: dict, section: str, dtype: str, path: str) -> None:
    """Effective GB/s vs size per provider, one panel per mode, copy bandwidth dashed."""
    modes = {"dropout": dropout.MODES, "ce": (ce.MODE,), "site": site_penalty.MODES}[section]
    x_key, xlabel = ("classes", "classes C (N = rows fixed)") if section == "ce" else ("numel", "elements n")
    titles = {"dropout": f"dropout, p={meta['p']}", "ce": "cross-entropy", "site": f"site penalty, q={meta['p']}"}
    what = titles[section]
    rows = [r for r in rows if r["section"] == section and r["dtype"] == dtype]
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != "copy"))
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes) + 0.5, 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    copy = sorted((r[x_key], r["gbps_eff"]) for r in rows if r["provider"] == "copy")
    for ax, mode in zip(axes, modes):
        for provider in providers:
            mine = [r for r in rows if (r["provider"], r["mode"]) == (provider, mode)]
            points = sorted((r[x_key], r["gbps_eff"]) for r in mine)
            ax.plot(*zip(*points), marker="o", label=provider)
        ax.plot(*zip(*copy), linestyle="--", color="gray", label="copy (y.copy_(x))")
        ax.set_xscale("log", base=2 if x_key == "numel" else 10)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{what}: {mode}, {dtype}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("effective GB/s (counted bytes / median time)")
    axes[-1].legend(fontsize="small")
    _save(fig, meta, path)


def _save(fig, meta: dict, path: str) -> None:
    """The run's device and versions as the figure's title, then the PNG written and the figure closed."""
    fig.suptitle(_title(meta), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speedup_bars(cases: list, bars: dict, ylabel: str, title: str, meta: dict, path: str,
                  one_label: str | None = None) -> None:
    """Grouped bars per case, one series per ``bars`` entry (label -> a value per case), each bar
    labelled "1.23x", and a gray line at 1 (in the legend as ``one_label`` when given)."""
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(2.2 * len(cases) + 2, 4.2))
    for i, (label, values) in enumerate(bars.items()):
        xs = [c + (i - (len(bars) - 1) / 2) * width for c in range(len(cases))]
        ax.bar_label(ax.bar(xs, values, width, label=label), fmt="%.2fx", fontsize="small")
    ax.axhline(1.0, color="gray", linewidth=0.8, label=one_label)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    _save(fig, meta, path)


def train_plot(rows: list, meta: dict, path: str) -> None:
    rows = [r for r in rows if r["section"] == "train" and r["provider"] != EAGER]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    bars = {}
    for variant in dict.fromkeys(r["provider"] for r in rows):
        by_case = {r["case"]: r["speedup_vs_eager"] for r in rows if r["provider"] == variant}
        bars[variant] = [by_case.get(c, 0.0) for c in cases]
    _speedup_bars(cases, bars, "speedup vs eager (median step time)", "training step speedup", meta, path,
                  one_label="eager = 1")


def train_reg_plot(rows: list, meta: dict, path: str) -> None:
    """Bars per case: reg_fused speedup vs reg_plain, and vs the eager dropout step (a cost, < 1)."""
    fused = [r for r in rows if r["section"] == "train" and r["provider"] == REG_FUSED]
    bars = {
        "reg_fused vs reg_plain (same objective)": [r.get("speedup_vs_reg_plain", 0.0) for r in fused],
        "reg_fused vs eager dropout step": [r["speedup_vs_eager"] for r in fused],
    }
    _speedup_bars([r["case"] for r in fused], bars, "speedup (baseline median / reg_fused median)",
                  "regularized training step (explicit sampled + implicit)", meta, path)


def write_plots(result: dict, out_dir: str) -> list:
    """Every plot the run's rows allow; returns the paths written."""
    rows, meta = result["rows"], result["meta"]
    paths = []
    for section, prefix in (("dropout", "dropout"), ("ce", "ce"), ("site", "site")):
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["section"] == section):
            paths.append(os.path.join(out_dir, f"{prefix}_{dtype}.png"))
            op_plot(rows, meta, section, dtype, paths[-1])
    if any(r["section"] == "train" for r in rows):
        paths.append(os.path.join(out_dir, "train_speedup.png"))
        train_plot(rows, meta, paths[-1])
    if any(r["section"] == "train" and r["provider"] == REG_FUSED for r in rows):
        paths.append(os.path.join(out_dir, "train_reg_speedup.png"))
        train_reg_plot(rows, meta, paths[-1])
    return paths
