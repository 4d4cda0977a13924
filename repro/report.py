"""Tables, plots and claim checks of the reproduction, all computed from ``results.json``.

``python -m repro report`` re-renders ``repro/results/README.md`` (the part between the
markers) and each dataset's ``results.md`` and ``curves.png`` from the JSON files, so every number
in them is one the run recorded. Mean ± std are over seeds (sample std, n−1); a method's runs that
diverged before their first evaluation are left out of its mean and counted in the table.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DATASETS = ("ptb", "fmnist")
# The claims are judged on the test metric of each run's best-validation weights: the best of many
# noisy validation evaluations is biased up, and more so for methods with noisier curves.
CLAIM_METRIC = "test_metric"
BEGIN = "<!-- BEGIN GENERATED: `python -m repro report` writes this part; do not edit by hand -->"
END = "<!-- END GENERATED -->"


# ------------------------------------------------------------------------------------------------
# Summary statistics
# ------------------------------------------------------------------------------------------------


def _mean_std(values: list) -> tuple:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(result: dict) -> dict:
    """Per method: mean and std over seeds of the best validation metric, the test metric at that
    epoch, the best epoch and the training seconds (wall-clock and CPU); the per-seed values; the
    diverged count."""
    summary = {}
    for method in result["methods"]:
        runs = [r for r in result["runs"] if r["method"] == method["name"]]
        done = [r for r in runs if r["best_val_metric"] is not None]
        entry = {"label": method["label"], "seeds": [r["seed"] for r in runs],
                 "diverged": sum(r["diverged"] for r in runs), "evaluated": len(done)}
        for key in ("best_val_metric", "test_metric", "best_epoch", "train_seconds", "train_cpu_seconds"):
            values = [r[key] for r in (runs if key.startswith("train_") else done) if r.get(key) is not None]
            entry[key] = {"mean": _mean_std(values)[0], "std": _mean_std(values)[1], "values": values}
        summary[method["name"]] = entry
    return summary


def _fmt(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def results_table(result: dict) -> str:
    """The Markdown results table of one dataset."""
    metric = result["meta"]["metric"]
    unit = "ppl" if metric == "perplexity" else "acc. %"
    summary = summarize(result)
    base = {key: summary.get("dropout", {}).get(key, {}).get("mean") for key in ("train_seconds", "train_cpu_seconds")}

    def ratio(s: dict, key: str) -> str:
        return f"{s[key]['mean'] / base[key]:.2f}×" if base[key] and s[key]["mean"] is not None else "–"

    lines = [
        f"| method | best val {unit} | test {unit} (at best val) | test {unit} per seed | best epoch "
        "| training s / run | time × dropout | CPU time × dropout | diverged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        per_seed = ", ".join(f"{v:.2f}" for v in s["test_metric"]["values"]) or "–"
        lines.append(
            f"| {s['label']} (`{name}`) | {_fmt(s['best_val_metric'], 2)} | {_fmt(s['test_metric'], 2)} | {per_seed} "
            f"| {_fmt(s['best_epoch'], 1)} | {s['train_seconds']['mean']:.1f} | {ratio(s, 'train_seconds')} "
            f"| {ratio(s, 'train_cpu_seconds')} | {s['diverged']}/{len(s['seeds'])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The paper's qualitative claims, decided on paired per-seed differences
# ------------------------------------------------------------------------------------------------

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
# "a matches b" allows a to trail b by this fraction of dropout's own gain over no regularization.
MATCH_FRACTION = 0.2
RULES = (
    "Every comparison pairs the runs of the same seed (same initial weights, same batches): d_s = the "
    f"advantage of the first method over the second in `{CLAIM_METRIC}` (the test metric at the best validation "
    "epoch) for seed s, in the metric's good direction. **a beats b**: reproduced when d_s > 0 for every seed and "
    "the mean of d exceeds its std over seeds; not reproduced when no seed has d_s > 0; inconclusive otherwise. "
    f"**a matches b**: with δ = {MATCH_FRACTION} × the mean paired gain of dropout over no regularization, "
    "reproduced when d_s ≥ −δ for every seed (a is within δ of b, or better); not reproduced when d_s < −δ for "
    "every seed; inconclusive otherwise (and when dropout has no gain to match). A claim made of several "
    "comparisons is reproduced when all of them are, not reproduced when any of them is not, inconclusive "
    "otherwise."
)


def paired(result: dict, a: str, b: str) -> Optional[dict]:
    """The per-seed advantages d_s of ``a`` over ``b`` (seeds where both were evaluated), with their
    mean and std; None when no seed has both."""
    sign = 1.0 if result["meta"]["higher_is_better"] else -1.0
    value = {(r["method"], r["seed"]): r[CLAIM_METRIC] for r in result["runs"] if r[CLAIM_METRIC] is not None}
    seeds = [s for s in result["meta"]["seeds"] if (a, s) in value and (b, s) in value]
    if not seeds:
        return None
    d = [sign * (value[a, s] - value[b, s]) for s in seeds]
    return {"a": a, "b": b, "seeds": seeds, "d": d, "mean": statistics.fmean(d),
            "std": statistics.stdev(d) if len(d) > 1 else 0.0}


def beats(cmp: Optional[dict]) -> str:
    if cmp is None:
        return INCONCLUSIVE
    if min(cmp["d"]) > 0 and cmp["mean"] > cmp["std"]:
        return REPRODUCED
    return NOT_REPRODUCED if max(cmp["d"]) <= 0 else INCONCLUSIVE


def matches(cmp: Optional[dict], margin: Optional[float]) -> str:
    if cmp is None or margin is None or margin <= 0:
        return INCONCLUSIVE
    if min(cmp["d"]) >= -margin:
        return REPRODUCED
    return NOT_REPRODUCED if max(cmp["d"]) < -margin else INCONCLUSIVE


def combine(verdicts: list) -> str:
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE


def match_margin(result: dict) -> Optional[float]:
    """δ of "a matches b": :data:`MATCH_FRACTION` × the mean paired gain of dropout over no
    regularization; None when either was not run."""
    names = {m["name"] for m in result["methods"]}
    gain = paired(result, "dropout", "none") if {"dropout", "none"} <= names else None
    return MATCH_FRACTION * gain["mean"] if gain else None


def check_claims(result: dict) -> list:
    """Rows (claim, [(comparison, kind, paired data, verdict)], verdict) for the paper's four claims
    (paper §3–5), decided by :data:`RULES`; a claim whose methods were not all run is left out."""
    names = {m["name"] for m in result["methods"]}
    ks = [1] + sorted(int(n[len("dropout_k"):]) for n in names if n.startswith("dropout_k") and n[9:].isdigit())
    noise = next((n for n in names if n.endswith("_noise")), None)

    def key(k: int) -> str:
        return "dropout" if k == 1 else f"dropout_k{k}"

    margin = match_margin(result)

    def beat(a: str, b: str) -> tuple:
        cmp = paired(result, a, b)
        return (a, "beats", b, cmp, beats(cmp))

    def match(a: str, b: str) -> tuple:
        cmp = paired(result, a, b)
        return (a, "matches", b, cmp, matches(cmp, margin))

    claims = []
    if len(ks) > 1:
        claims.append((f"DROPOUT_k degrades as k grows, k = {', '.join(map(str, ks))} (Fig. 1)",
                       [beat(key(a), key(b)) for a, b in zip(ks, ks[1:])]))
    if noise is not None:
        k = int(noise[len("dropout_k"):-len("_noise")])
        if key(k) in names:
            claims.append((f"DROPOUT_{k} + √(1−1/{k})·ξ recovers DROPOUT_1 (Figs. 2, 4)",
                           [match(noise, "dropout"), beat(noise, key(k))]))
    if {"explicit", "none", "dropout"} <= names:
        claims.append(("R_approx alone beats no regularization but trails DROPOUT_1 (Fig. 3)",
                       [beat("explicit", "none"), beat("dropout", "explicit")]))
    if {"explicit_implicit", "dropout", "none"} <= names:
        claims.append(("R_approx + ξ_approx matches DROPOUT_1 (Fig. 5)", [match("explicit_implicit", "dropout")]))
    return [(claim, parts, combine([p[-1] for p in parts])) for claim, parts in claims]


def _describe(part: tuple, labels: dict, margin_text: str) -> str:
    a, kind, b, cmp, verdict = part
    if cmp is None:
        return f"{labels[a]} {kind} {labels[b]}: no seed with both evaluated → {verdict}"
    per_seed = ", ".join(f"{d:+.2f}" for d in cmp["d"])
    extra = f", δ = {margin_text}" if kind == "matches" else ""
    return (f"{labels[a]} {kind} {labels[b]}: d = {per_seed} (seeds {', '.join(map(str, cmp['seeds']))}; "
            f"mean {cmp['mean']:+.2f} ± {cmp['std']:.2f}{extra}) → {verdict}")


def claims_table(result: dict) -> str:
    rows = check_claims(result)
    if not rows:
        return "(no claim of the paper has all its methods in this run)"
    labels = {m["name"]: f"`{m['name']}`" for m in result["methods"]}
    margin = match_margin(result)
    margin_text = f"{margin:.2f}" if margin is not None else "n/a"
    lines = ["| paper's claim | paired per-seed differences d (positive: the first is better) | verdict |",
             "|---|---|---|"]
    for claim, parts, verdict in rows:
        data = "<br>".join(_describe(p, labels, margin_text) for p in parts)
        lines.append(f"| {claim} | {data} | **{verdict}** |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------


def _curves(result: dict, name: str, metric: str) -> tuple:
    """(epochs, mean, std, mean training seconds) over seeds of a method's ``metric`` ("val_metric" or
    "test_metric") per epoch, epochs >= 1 (results written before test curves were recorded have none)."""
    runs = [r["history"] for r in result["runs"] if r["method"] == name]
    epochs, means, stds, seconds = [], [], [], []
    for epoch in range(1, max((len(h) for h in runs), default=0)):
        points = [h[epoch] for h in runs if len(h) > epoch and h[epoch].get(metric) is not None]
        if not points:
            continue
        values = [p[metric] for p in points]
        epochs.append(epoch)
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        seconds.append(statistics.fmean(p["train_seconds"] for p in points))
    return epochs, means, stds, seconds


def plot_curves(result: dict, path: str) -> None:
    """Validation and test metric vs epoch (band: ± std over seeds), and validation metric vs training
    wall-clock, mean over seeds."""
    meta = result["meta"]
    fig, (by_epoch, test_by_epoch, by_time) = plt.subplots(1, 3, figsize=(20, 5.5))
    colors = plt.get_cmap("tab10").colors
    finals = []
    for index, method in enumerate(result["methods"]):
        style = dict(color=colors[index % len(colors)], markersize=3, label=method["label"],
                     linestyle="--" if method["name"].startswith("dropout_k") else "-")
        for ax, metric in ((by_epoch, "val_metric"), (test_by_epoch, "test_metric")):
            epochs, means, stds, seconds = _curves(result, method["name"], metric)
            if not epochs:
                continue
            marker = "o" if len(epochs) <= 20 else None
            ax.plot(epochs, means, marker=marker, **style)
            ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=style["color"], alpha=0.06)
            finals += means[len(means) // 2:]
            if metric == "val_metric":
                by_time.plot(seconds, means, marker=marker, **style)
    if finals:  # zoom on the second half of training, where the methods separate
        low, high = min(finals), max(finals)
        pad = 0.15 * (high - low) + 1e-6
        for ax in (by_epoch, test_by_epoch, by_time):
            ax.set_ylim(low - pad, high + pad)
    unit = " (%)" if meta["metric"] == "accuracy" else ""
    for ax, xlabel, split in ((by_epoch, "epoch", "validation"), (test_by_epoch, "epoch", "test"),
                              (by_time, "training wall-clock (s), mean over seeds", "validation")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{split} {meta['metric']}{unit}")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8, loc="best")
    fig.suptitle(f"{meta['dataset_title']} (--preset {meta['preset']}), seeds {', '.join(map(str, meta['seeds']))}, "
                 f"q = {meta['config']['q']}; {meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def dataset_markdown(result: dict, image: str = "curves.png") -> str:
    """The Markdown of one dataset: how it was run, the results table, the claim checks, the plot."""
    meta = result["meta"]
    config = ", ".join(f"{k}={v}" for k, v in meta["config"].items() if k != "expected_time")
    return "\n".join([
        f"### {meta['dataset_title']} (`{meta['command']}`)",
        "",
        f"- data: {meta['data']}",
        f"- model: {meta['model']}",
        f"- config: {config}",
        f"- seeds: {', '.join(map(str, meta['seeds']))}; device: {meta['device']}; {meta['jobs']} parallel "
        f"process(es) × {meta['threads']} torch thread(s); backend `{meta['backend']}`",
        f"- versions: torch {meta['versions']['torch']}, dropreg_ext {meta['versions']['dropreg_ext']}; "
        f"date {meta['date']}",
        f"- total elapsed: {meta['elapsed_seconds']:.0f} s ({meta['elapsed_seconds'] / 60:.1f} min), "
        "data loading and evaluation included",
        "",
        results_table(result),
        "",
        claims_table(result),
        "",
        f"Metric: {meta['metric']} ({'higher' if meta['higher_is_better'] else 'lower'} is better). {RULES} "
        "The time ratios are mean training seconds per run against dropout's: wall-clock, and the process CPU "
        "time of the same steps (less sensitive to a busy neighbour on the machine).",
        "",
        f"![validation and test {meta['metric']} vs epoch, validation vs wall-clock]({image})",
        "",
    ])


PRESETS = ("quick", "cpu", "full")


def folder_name(dataset: str, preset: str) -> str:
    """The results folder of a (dataset, preset) under the results root: ``ptb`` for --quick (the
    CI-sized runs), ``ptb-cpu`` and ``ptb-full`` for the others."""
    return dataset if preset == "quick" else f"{dataset}-{preset}"


def save(result: dict, folder: str) -> None:
    """Write ``folder/results.json`` (with the per-method summary added)."""
    os.makedirs(folder, exist_ok=True)
    result["summary"] = summarize(result)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


def render(root: str = RESULTS_ROOT) -> str:
    """From every ``root/<dataset>[-<preset>]/results.json``: write that folder's ``results.md`` and
    ``curves.png``, and regenerate the part of ``root/README.md`` between the markers (the text
    around it is kept; a missing README gets a stub). Returns the README's path."""
    parts = []
    for preset in PRESETS:
        for dataset in DATASETS:
            name = folder_name(dataset, preset)
            path = os.path.join(root, name, "results.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                result = json.load(f)
            with open(os.path.join(root, name, "results.md"), "w") as f:
                f.write(dataset_markdown(result))
            plot_curves(result, os.path.join(root, name, "curves.png"))
            parts.append(dataset_markdown(result, image=f"{name}/curves.png"))
    generated = "\n".join([BEGIN, "", *(parts or ["(no results yet)", ""]), END])
    path = os.path.join(root, "README.md")
    text = open(path).read() if os.path.isfile(path) else f"# Reproduction results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1) if BEGIN in text else (text + "\n", END)
    tail = rest.split(END, 1)[1] if END in rest else "\n"
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        f.write(head + generated + tail)
    return path
