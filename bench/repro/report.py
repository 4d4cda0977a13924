"""Tables, plots and claim checks of the reproduction, all computed from ``results.json``.

``python -m bench.repro report`` re-renders ``bench/results/repro/README.md`` (the part between the
markers) and each dataset's ``results.md`` and ``curves.png`` from the JSON files, so every number
in them is one the run recorded. Mean ± std are over seeds (sample std, n−1); a method's runs that
diverged before their first evaluation are left out of its mean and counted in the table.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "repro")
DATASETS = ("ptb", "fmnist")
# The claims are judged on the test metric of each run's best-validation weights: the best of many
# noisy validation evaluations is biased up, and more so for methods with noisier curves.
CLAIM_METRIC = "test_metric"
BEGIN = "<!-- BEGIN GENERATED: `python -m bench.repro report` writes this part; do not edit by hand -->"
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
    epoch, the best epoch and the training seconds; the per-seed values; the diverged count."""
    summary = {}
    for method in result["methods"]:
        runs = [r for r in result["runs"] if r["method"] == method["name"]]
        done = [r for r in runs if r["best_val_metric"] is not None]
        entry = {"label": method["label"], "seeds": [r["seed"] for r in runs],
                 "diverged": sum(r["diverged"] for r in runs), "evaluated": len(done)}
        for key in ("best_val_metric", "test_metric", "best_epoch", "train_seconds"):
            values = [r[key] for r in (runs if key == "train_seconds" else done)]
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
    base = summary.get("dropout", {}).get("train_seconds", {}).get("mean")
    lines = [
        f"| method | best val {unit} | test {unit} (at best val) | test {unit} per seed | best epoch "
        "| training s / run | time × dropout | diverged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        per_seed = ", ".join(f"{v:.2f}" for v in s["test_metric"]["values"]) or "–"
        seconds = s["train_seconds"]["mean"]
        ratio = f"{seconds / base:.1f}×" if base else "–"
        lines.append(
            f"| {s['label']} (`{name}`) | {_fmt(s['best_val_metric'], 2)} | {_fmt(s['test_metric'], 2)} | {per_seed} "
            f"| {_fmt(s['best_epoch'], 1)} | {seconds:.1f} | {ratio} | {s['diverged']}/{len(s['seeds'])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The paper's qualitative claims, checked against our numbers
# ------------------------------------------------------------------------------------------------


def _compare(summary: dict, a: str, b: str, higher_is_better: bool) -> tuple:
    """(advantage of a over b in the metric's good direction, combined seed spread sqrt(sa² + sb²)),
    or None when either has no evaluated run."""
    sa, sb = summary[a][CLAIM_METRIC], summary[b][CLAIM_METRIC]
    if sa["mean"] is None or sb["mean"] is None:
        return None
    sign = 1.0 if higher_is_better else -1.0
    return sign * (sa["mean"] - sb["mean"]), math.hypot(sa["std"], sb["std"])


def _better(cmp) -> str:
    """'yes' if the advantage exceeds the spread, 'no' if the opposite does, else the direction alone."""
    if cmp is None:
        return "n/a (no evaluated run)"
    gain, spread = cmp
    if gain > spread:
        return "yes"
    if gain < -spread:
        return "no"
    return "direction matches, within seed spread" if gain > 0 else "no (opposite direction, within seed spread)"


def _matches(cmp) -> str:
    """'yes' when a is within the spread of b or better than it, else 'no'."""
    if cmp is None:
        return "n/a (no evaluated run)"
    gain, spread = cmp
    if gain > spread:
        return "yes (better)"
    return "yes (within seed spread)" if gain >= -spread else "no"


def check_claims(result: dict) -> list:
    """Rows (claim, our numbers, verdict) for the paper's §3 claims, judged on :data:`CLAIM_METRIC`;
    a claim whose methods were not all run is left out."""
    summary = summarize(result)
    hib = result["meta"]["higher_is_better"]
    ks = [1] + sorted(int(n[len("dropout_k"):]) for n in summary if n.startswith("dropout_k") and n[9:].isdigit())
    noise = next((n for n in summary if n.endswith("_noise")), None)

    def key(k: int) -> str:
        return "dropout" if k == 1 else f"dropout_k{k}"

    def val(name: str) -> str:
        return f"{summary[name]['label']} {_fmt(summary[name][CLAIM_METRIC], 2)}"

    def compare(a: str, b: str):
        return _compare(summary, a, b, hib)

    def degrades() -> str:
        means = [summary[key(k)][CLAIM_METRIC]["mean"] for k in ks]
        if None in means:
            return "n/a (no evaluated run)"
        end = _better(compare(key(ks[0]), key(ks[-1])))
        if all((b - a) * (-1 if hib else 1) > 0 for a, b in zip(means, means[1:])):
            return "yes" if end == "yes" else "direction matches (monotone in k), within seed spread"
        return f"no (not monotone in k); DROPOUT_1 better than DROPOUT_{ks[-1]}: {end}"

    def restores(k: int) -> str:
        restored, close = _better(compare(noise, key(k))), _matches(compare(noise, "dropout"))
        if restored == "yes" and close.startswith("yes"):
            return "yes"
        return f"better than DROPOUT_{k}: {restored}; matches DROPOUT_1: {close}"

    claims = [
        ("explicit alone beats no regularization (Fig. 3)", ["explicit", "none"],
         lambda: f"{val('explicit')} vs {val('none')}", lambda: _better(compare("explicit", "none"))),
        ("… but trails dropout (Fig. 3)", ["explicit", "dropout"],
         lambda: f"{val('explicit')} vs {val('dropout')}", lambda: _better(compare("dropout", "explicit"))),
        ("explicit + implicit matches dropout (Fig. 5)", ["explicit_implicit", "dropout"],
         lambda: f"{val('explicit_implicit')} vs {val('dropout')}",
         lambda: _matches(compare("explicit_implicit", "dropout"))),
        ("DROPOUT_k degrades as k grows (Fig. 1)", [key(k) for k in ks] if len(ks) > 1 else ["DROPOUT_k"],
         lambda: "; ".join(val(key(k)) for k in ks), degrades),
    ]
    if noise is not None:
        k = int(noise[len("dropout_k"):-len("_noise")])
        claims.append((f"adding √(1−1/k)·ξ to DROPOUT_{k} restores DROPOUT_1 (Figs. 2, 4)", [noise, key(k), "dropout"],
                       lambda: f"{val(noise)} vs {val(key(k))} and {val('dropout')}", lambda: restores(k)))
    return [(claim, numbers(), verdict()) for claim, needed, numbers, verdict in claims
            if all(name in summary for name in needed)]


def claims_table(result: dict) -> str:
    lines = ["| paper's claim (§3) | ours: test at best val, mean ± std over seeds | reproduced? |",
             "|---|---|---|"]
    rows = check_claims(result)
    if not rows:
        return "(no claim of the paper has all its methods in this run)"
    return "\n".join(lines + [f"| {c} | {n} | {v} |" for c, n, v in rows])


# ------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------


def _curves(result: dict, name: str) -> tuple:
    """(epochs, mean, std, mean training seconds) of a method's validation metric over seeds, epochs >= 1."""
    runs = [r["history"] for r in result["runs"] if r["method"] == name]
    epochs, means, stds, seconds = [], [], [], []
    for epoch in range(1, max((len(h) for h in runs), default=0)):
        points = [h[epoch] for h in runs if len(h) > epoch]
        values = [p["val_metric"] for p in points]
        epochs.append(epoch)
        means.append(statistics.fmean(values))
        stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        seconds.append(statistics.fmean(p["train_seconds"] for p in points))
    return epochs, means, stds, seconds


def plot_curves(result: dict, path: str) -> None:
    """Validation metric vs epoch (band: ± std over seeds) and vs training wall-clock, mean over seeds."""
    meta = result["meta"]
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = plt.get_cmap("tab10").colors
    finals = []
    for index, method in enumerate(result["methods"]):
        epochs, means, stds, seconds = _curves(result, method["name"])
        if not epochs:
            continue
        style = dict(color=colors[index % len(colors)], marker="o" if len(epochs) <= 20 else None, markersize=3,
                     label=method["label"], linestyle="--" if method["name"].startswith("dropout_k") else "-")
        by_epoch.plot(epochs, means, **style)
        by_epoch.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=style["color"], alpha=0.06)
        by_time.plot(seconds, means, **style)
        finals += means[len(means) // 2:]
    if finals:  # zoom on the second half of training, where the methods separate
        low, high = min(finals), max(finals)
        pad = 0.15 * (high - low) + 1e-6
        for ax in (by_epoch, by_time):
            ax.set_ylim(low - pad, high + pad)
    ylabel = f"validation {meta['metric']}" + (" (%)" if meta["metric"] == "accuracy" else "")
    for ax, xlabel in ((by_epoch, "epoch"), (by_time, "training wall-clock (s), mean over seeds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8, loc="best")
    fig.suptitle(f"{meta['dataset_title']} (--{meta['preset']}), seeds {', '.join(map(str, meta['seeds']))}, "
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
        f"Metric: {meta['metric']} ({'higher' if meta['higher_is_better'] else 'lower'} is better). A difference "
        "counts (\"yes\"/\"no\") when it exceeds √(s_a² + s_b²), s = the std over seeds (the seed-to-seed "
        "spread, not the standard error); smaller differences only give a direction.",
        "",
        f"![validation {meta['metric']} vs epoch and vs wall-clock]({image})",
        "",
    ])


def save(result: dict, root: str = RESULTS_ROOT) -> None:
    """Write ``root/<dataset>/results.json`` (with the per-method summary added)."""
    folder = os.path.join(root, result["meta"]["dataset"])
    os.makedirs(folder, exist_ok=True)
    result["summary"] = summarize(result)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


def render(root: str = RESULTS_ROOT) -> str:
    """From every ``root/<dataset>/results.json``: write that folder's ``results.md`` and
    ``curves.png``, and regenerate the part of ``root/README.md`` between the markers (the text
    around it is kept; a missing README gets a stub). Returns the README's path."""
    parts = []
    for dataset in DATASETS:
        path = os.path.join(root, dataset, "results.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            result = json.load(f)
        with open(os.path.join(root, dataset, "results.md"), "w") as f:
            f.write(dataset_markdown(result))
        plot_curves(result, os.path.join(root, dataset, "curves.png"))
        parts.append(dataset_markdown(result, image=f"{dataset}/curves.png"))
    generated = "\n".join([BEGIN, "", *(parts or ["(no results yet)", ""]), END])
    path = os.path.join(root, "README.md")
    text = open(path).read() if os.path.isfile(path) else f"# Reproduction results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1) if BEGIN in text else (text + "\n", END)
    tail = rest.split(END, 1)[1] if END in rest else "\n"
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        f.write(head + generated + tail)
    return path
