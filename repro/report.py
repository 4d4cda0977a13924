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

from . import stats

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


def cpu_ratio(result: dict, run: dict) -> Optional[float]:
    """A run's CPU seconds per training step over those of a dropout step measured in the same sitting
    (None for runs from before sittings were recorded)."""
    sittings = {s["index"]: s for s in result["meta"].get("sittings", [])}
    sitting = sittings.get(run.get("sitting"), {})
    if not sitting.get("dropout_step_cpu_seconds") or not run["steps"]:
        return None
    return run["train_cpu_seconds"] / run["steps"] / sitting["dropout_step_cpu_seconds"]


def summarize(result: dict) -> dict:
    """Per method: mean and std over seeds of the best validation metric, the test metric at that
    epoch, the best epoch, the training CPU seconds and their ratio to a dropout step of the same
    sitting; the per-seed values; the diverged count."""
    summary = {}
    for method in result["methods"]:
        runs = [r for r in result["runs"] if r["method"] == method["name"]]
        done = [r for r in runs if r["best_val_metric"] is not None]
        entry = {"label": method["label"], "seeds": [r["seed"] for r in runs],
                 "diverged": sum(r["diverged"] for r in runs), "evaluated": len(done)}
        for key in ("best_val_metric", "test_metric", "best_epoch", "train_cpu_seconds"):
            values = [r[key] for r in (runs if key.startswith("train_") else done) if r.get(key) is not None]
            entry[key] = {"mean": _mean_std(values)[0], "std": _mean_std(values)[1], "values": values}
        ratios = [ratio for ratio in (cpu_ratio(result, r) for r in runs) if ratio is not None]
        entry["cpu_time_x_dropout"] = {"mean": _mean_std(ratios)[0], "std": _mean_std(ratios)[1], "values": ratios}
        summary[method["name"]] = entry
    return summary


def _fmt(stat: dict, digits: int) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _fraction_text(fraction: Optional[dict]) -> str:
    if fraction is None:
        return "–"
    if fraction.get("reference"):
        return f"{fraction['ratio']:.0%} (by definition)"
    low, high = fraction["low"], fraction["high"]
    interval = f"[{low:.0%}, {high:.0%}]" if low is not None else "unbounded"
    return f"{fraction['ratio']:.0%} {interval}"


def results_table(result: dict, analysis: dict) -> str:
    """The Markdown results table of one dataset."""
    metric = result["meta"]["metric"]
    unit = "ppl" if metric == "perplexity" else "acc. %"
    summary = summarize(result)
    lines = [
        f"| method | n | best val {unit} | test {unit} (at best val) | test {unit} per seed | share of dropout's gain "
        "[95% CI] | best epoch | training CPU s / run | CPU time × dropout step (same sitting) | diverged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summary.items():
        per_seed = ", ".join(f"{seed}: {v:.2f}" for seed, v in zip(s["seeds"], s["test_metric"]["values"])) or "–"
        ratios = s["cpu_time_x_dropout"]
        timed = f"{ratios['mean']:.2f}× ({len(ratios['values'])} runs)" if ratios["values"] else "–"
        lines.append(
            f"| {s['label']} (`{name}`) | {s['evaluated']} | {_fmt(s['best_val_metric'], 2)} "
            f"| {_fmt(s['test_metric'], 2)} | {per_seed} | {_fraction_text(analysis['fractions'].get(name))} "
            f"| {_fmt(s['best_epoch'], 1)} | {_fmt(s['train_cpu_seconds'], 0)} | {timed} "
            f"| {s['diverged']}/{len(s['seeds'])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The paper's claims, decided by pre-registered tests on paired per-seed differences
# ------------------------------------------------------------------------------------------------

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
# δ of "a matches b": this fraction of dropout's mean paired gain over no regularization.
MATCH_FRACTION = 0.2
RULES = (
    "**How the verdicts are decided** (fixed before the runs of issue 28, in `repro/report.py` and "
    "`repro/stats.py`). Every comparison pairs the runs of the same seed (same initial weights, same batches): "
    f"d_s = the advantage of the first method over the second in `{CLAIM_METRIC}` (the test metric at the best "
    "validation epoch) for seed s, in the metric's good direction; n seeds, mean d̄, standard deviation s, "
    f"Student's t with n − 1 degrees of freedom, α = {stats.ALPHA}. "
    "**a beats b**: one-sided paired t-test of mean d > 0, its p adjusted by Holm's method over every *beats* "
    f"comparison of the dataset (the family); reproduced when the adjusted p < {stats.ALPHA}; not reproduced when "
    "the one-sided 95% upper confidence bound of the mean is below 0 (b is better); inconclusive otherwise. "
    f"**a matches b** (also *recovers*): two one-sided tests (TOST) of equivalence within ±δ, δ = {MATCH_FRACTION} "
    f"× dropout's mean paired gain over no regularization; reproduced when p_TOST < {stats.ALPHA} (the 90% interval "
    "of the mean inside ±δ); not reproduced when the 95% interval lies entirely outside ±δ; inconclusive "
    "otherwise, and when dropout has no gain. A claim made of several comparisons is reproduced when all of them "
    "are, not reproduced when any is not, inconclusive otherwise. For an inconclusive comparison, *n to decide* is "
    f"the number of seeds at which the test would pass (or fail) with {stats.POWER:.0%} power if the observed mean "
    "and standard deviation were the truth (for *beats* at the strictest Holm level α/m). The share of dropout's gain "
    "recovered by a method is mean(d_method,none)/mean(d_dropout,none) over the seeds where all three ran, with a 95% "
    "interval by Fieller's theorem (unbounded when dropout's gain is not significant)."
)


def paired(result: dict, a: str, b: str) -> Optional[dict]:
    """The per-seed advantages d_s of ``a`` over ``b`` (seeds where both were evaluated) with their
    summary (:func:`stats.summary`); None when no seed has both."""
    sign = 1.0 if result["meta"]["higher_is_better"] else -1.0
    value = {(r["method"], r["seed"]): r[CLAIM_METRIC] for r in result["runs"] if r[CLAIM_METRIC] is not None}
    seeds = sorted(s for (m, s) in value if m == a and (b, s) in value)
    if not seeds:
        return None
    d = [sign * (value[a, s] - value[b, s]) for s in seeds]
    return {"a": a, "b": b, "seeds": seeds, "d": d, **stats.summary(d)}


def _key(k: int) -> str:
    return "dropout" if k == 1 else f"dropout_k{k}"


def claim_specs(names: set) -> list:
    """(claim, [(a, kind, b)]) for the paper's claims whose methods were all run, kind "beats" or "matches"."""
    ks = [1] + sorted(int(n[len("dropout_k"):]) for n in names if n.startswith("dropout_k") and n[9:].isdigit())
    specs = []
    if len(ks) > 1:
        specs.append((f"DROPOUT_k degrades as k grows, k = {', '.join(map(str, ks))} (§3, Fig. 1)",
                      [(_key(a), "beats", _key(b)) for a, b in zip(ks, ks[1:])]))
    for name in sorted(names):
        for suffix, noise, where in (("_drop_noise", "ξ̃_drop, the exact dropout noise", "§3.1, Fig. 2"),
                                     ("_noise", "ξ_approx", "§4.2, Fig. 4")):
            k = name[len("dropout_k"):-len(suffix)] if name.startswith("dropout_k") and name.endswith(suffix) else ""
            if k.isdigit() and _key(int(k)) in names and "none" in names:
                specs.append((f"DROPOUT_{k} + √(1−1/{k})·{noise} recovers DROPOUT_1 ({where})",
                              [(name, "matches", "dropout"), (name, "beats", _key(int(k)))]))
    if {"explicit", "none", "dropout"} <= names:
        specs.append(("R_approx alone beats no regularization but trails DROPOUT_1 (§5, Fig. 3)",
                      [("explicit", "beats", "none"), ("dropout", "beats", "explicit")]))
    if {"explicit_implicit", "dropout", "none"} <= names:
        specs.append(("R_approx + ξ_approx matches DROPOUT_1 (§5, Fig. 5)",
                      [("explicit_implicit", "matches", "dropout")]))
    if {"explicit_implicit", "explicit"} <= names:
        specs.append(("Adding ξ_approx to R_approx helps: the implicit effect (§5, Figs. 3 and 5)",
                      [("explicit_implicit", "beats", "explicit")]))
    if {"explicit", "explicit_identity"} <= names:
        specs.append(("R_approx beats the explicit regularizer with H_out = identity (§5.2)",
                      [("explicit", "beats", "explicit_identity")]))
    return specs


def _decide_beats(cmp: dict, p_holm: Optional[float], family: int) -> tuple:
    """(verdict, n to decide) of "a beats b" (:data:`RULES`)."""
    if p_holm is None:
        return INCONCLUSIVE, None
    if p_holm < stats.ALPHA:
        return REPRODUCED, None
    upper = cmp["mean"] + stats.t_quantile(1 - stats.ALPHA, cmp["n"] - 1) * cmp["se"]
    if upper < 0:
        return NOT_REPRODUCED, None
    return INCONCLUSIVE, stats.seeds_to_decide(cmp["sd"], abs(cmp["mean"]), stats.ALPHA / family)


def _decide_matches(cmp: dict, p_tost: Optional[float], margin: Optional[float]) -> tuple:
    """(verdict, n to decide) of "a matches b" (:data:`RULES`)."""
    if p_tost is None or margin is None:
        return INCONCLUSIVE, None
    if p_tost < stats.ALPHA:
        return REPRODUCED, None
    low, high = stats.interval(cmp["d"], 0.95)
    if low > margin or high < -margin:
        return NOT_REPRODUCED, None
    gap = margin - abs(cmp["mean"])
    if gap > 0:
        return INCONCLUSIVE, stats.seeds_to_decide(cmp["sd"], gap, stats.ALPHA)
    return INCONCLUSIVE, stats.seeds_to_decide(cmp["sd"], -gap, stats.ALPHA / 2)


def analyze(result: dict) -> dict:
    """Every claim's comparisons with their test statistics and verdicts, the margin δ and each method's
    share of dropout's gain: what the tables print and ``results.json`` keeps under ``"analysis"``."""
    names = {m["name"] for m in result["methods"]}
    gain = paired(result, "dropout", "none") if {"dropout", "none"} <= names else None
    margin = MATCH_FRACTION * gain["mean"] if gain and gain["mean"] > 0 else None
    specs = claim_specs(names)
    comparisons = {}
    for _, parts in specs:
        for a, kind, b in parts:
            comparisons.setdefault((a, kind, b), paired(result, a, b))
    beats = [key for key in comparisons if key[1] == "beats"]
    raw = {key: stats.one_sided_p(comparisons[key]["d"]) if comparisons[key] else None for key in beats}
    adjusted = dict(zip(beats, stats.holm([raw[key] for key in beats])))
    family = sum(p is not None for p in raw.values())
    decided = {}
    for key, cmp in comparisons.items():
        a, kind, b = key
        entry = {"a": a, "kind": kind, "b": b, **(cmp or {"n": 0})}
        if cmp is not None and cmp["n"] >= 2:
            entry["ci95"] = stats.interval(cmp["d"], 0.95)
            entry["ci90"] = stats.interval(cmp["d"], 0.90)
        if kind == "beats":
            entry["p_one_sided"], entry["p_holm"] = raw[key], adjusted[key]
            entry["verdict"], entry["n_to_decide"] = (_decide_beats(cmp, adjusted[key], family) if cmp
                                                      else (INCONCLUSIVE, None))
        else:
            entry["delta"] = margin
            entry["p_tost"] = stats.tost_p(cmp["d"], margin) if cmp and margin is not None else None
            entry["verdict"], entry["n_to_decide"] = (_decide_matches(cmp, entry["p_tost"], margin) if cmp
                                                      else (INCONCLUSIVE, None))
        decided[key] = entry
    claims = []
    for claim, parts in specs:
        verdicts = [decided[part]["verdict"] for part in parts]
        verdict = (REPRODUCED if all(v == REPRODUCED for v in verdicts) else
                   NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE)
        claims.append({"claim": claim, "comparisons": [decided[part] for part in parts], "verdict": verdict})
    return {"alpha": stats.ALPHA, "match_fraction": MATCH_FRACTION, "delta": margin, "holm_family": family,
            "claims": claims, "fractions": _fractions(result, names)}


def _fractions(result: dict, names: set) -> dict:
    """Per method: its share of dropout's gain over no regularization with Fieller's 95% interval."""
    if not {"none", "dropout"} <= names:
        return {}
    gain = paired(result, "dropout", "none")
    fractions = {"none": {"ratio": 0.0, "reference": True}, "dropout": {"ratio": 1.0, "reference": True}}
    for name in (m["name"] for m in result["methods"] if m["name"] not in ("none", "dropout")):
        own = paired(result, name, "none")
        if own is None or gain is None:
            continue
        seeds = [s for s in own["seeds"] if s in gain["seeds"]]
        num = [d for s, d in zip(own["seeds"], own["d"]) if s in seeds]
        den = [d for s, d in zip(gain["seeds"], gain["d"]) if s in seeds]
        interval = stats.fieller(num, den)
        if interval is not None:
            fractions[name] = {**interval, "n": len(seeds)}
    return fractions


def _describe(part: dict, labels: dict) -> str:
    a, kind, b = labels[part["a"]], part["kind"], labels[part["b"]]
    if part["n"] == 0:
        return f"{a} {kind} {b}: no seed with both evaluated → {part['verdict']}"
    per_seed = ", ".join(f"{d:+.2f}" for d in part["d"])
    text = f"{a} {kind} {b}: n = {part['n']}, d = {per_seed}; mean {part['mean']:+.2f}"
    if part["n"] >= 2:
        level, (low, high) = ("90%", part["ci90"]) if kind == "matches" else ("95%", part["ci95"])
        text += f", {level} CI [{low:+.2f}, {high:+.2f}]"
        if kind == "beats":
            text += f", p = {part['p_one_sided']:.3g} (Holm {part['p_holm']:.3g})"
        elif part["delta"] is not None:
            text += f", δ = {part['delta']:.2f}, p_TOST = {part['p_tost']:.3g}"
    if part["verdict"] == INCONCLUSIVE and part["n"] >= 2:
        n = part["n_to_decide"]
        text += f"; n to decide ≈ {n}" if n is not None else f"; no n up to {stats.MAX_SEEDS} decides it"
    return f"{text} → {part['verdict']}"


def claims_table(result: dict, analysis: dict) -> str:
    if not analysis["claims"]:
        return "(no claim of the paper has all its methods in this run)"
    labels = {m["name"]: f"`{m['name']}`" for m in result["methods"]}
    lines = ["| paper's claim | paired per-seed differences d (positive: the first is better) and tests | verdict |",
             "|---|---|---|"]
    for claim in analysis["claims"]:
        data = "<br>".join(_describe(part, labels) for part in claim["comparisons"])
        lines.append(f"| {claim['claim']} | {data} | **{claim['verdict']}** |")
    return "\n".join(lines)


def verdict_summary(results: list) -> str:
    """The summary of every dataset's verdicts: one line per claim, what the README says the runs show."""
    lines = ["| run | claim | verdict | seeds (n) |", "|---|---|---|---|"]
    for name, result, analysis in results:
        for claim in analysis["claims"]:
            ns = sorted({part["n"] for part in claim["comparisons"]})
            lines.append(f"| `{name}` | {claim['claim']} | **{claim['verdict']}** | {', '.join(map(str, ns))} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------


def _curves(result: dict, name: str, metric: str) -> tuple:
    """(epochs, mean, std, mean training CPU seconds) over seeds of a method's ``metric`` ("val_metric" or
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
        cpu = [p.get("train_cpu_seconds") for p in points]  # not recorded in the oldest results
        seconds.append(statistics.fmean(cpu) if None not in cpu else None)
    return epochs, means, stds, seconds


def plot_curves(result: dict, path: str) -> None:
    """Validation and test metric vs epoch (band: ± std over seeds), and validation metric vs training
    CPU seconds (not wall-clock: sittings under different load would not compare), mean over seeds."""
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
            if metric == "val_metric" and None not in seconds:
                by_time.plot(seconds, means, marker=marker, **style)
    if finals:  # zoom on the second half of training, where the methods separate
        low, high = min(finals), max(finals)
        pad = 0.15 * (high - low) + 1e-6
        for ax in (by_epoch, test_by_epoch, by_time):
            ax.set_ylim(low - pad, high + pad)
    unit = " (%)" if meta["metric"] == "accuracy" else ""
    for ax, xlabel, split in ((by_epoch, "epoch", "validation"), (test_by_epoch, "epoch", "test"),
                              (by_time, "training CPU time (s), mean over seeds", "validation")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{split} {meta['metric']}{unit}")
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=8, loc="best")
    fig.suptitle(f"{meta['dataset_title']} (--preset {meta['preset']}), seeds {', '.join(map(str, meta['seeds']))}, "
                 f"q = {meta['config']['q']}; {meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _sitting_lines(meta: dict) -> list:
    """One line per sitting (the code and the load each ran under); results from before sittings were
    recorded give their single process layout."""
    if not meta.get("sittings"):
        return [f"- {meta['jobs']} parallel process(es) × {meta['threads']} torch thread(s); commit not recorded"]
    lines = []
    for s in meta["sittings"]:
        commit = f"commit {s['commit'][:7]}" if s.get("commit") else "commit not recorded"
        step = s.get("dropout_step_cpu_seconds")
        dirty = " with uncommitted changes" if s.get("dirty") else ""
        lines.append(f"- sitting {s['index']} ({s['date']}, {s['device']}): {commit}{dirty}, {s['jobs']} process(es) "
                     f"× {s['threads']} thread(s)" + (f", dropout step {step:.3f} CPU s" if step else ""))
    return lines


def dataset_markdown(result: dict, image: str = "curves.png") -> str:
    """The Markdown of one dataset: how it was run, the results table, the claim checks, the plot."""
    meta = result["meta"]
    analysis = analyze(result)
    config = ", ".join(f"{k}={v}" for k, v in meta["config"].items() if k != "expected_time")
    untimed = sorted({r["seed"] for r in result["runs"] if cpu_ratio(result, r) is None})
    return "\n".join([
        f"### {meta['dataset_title']} (`{meta['command']}`)",
        "",
        f"- data: {meta['data']}",
        f"- model: {meta['model']}",
        f"- config: {config}",
        f"- seeds: {', '.join(map(str, meta['seeds']))}; device: {meta['device']}; backend `{meta['backend']}`",
        f"- versions: torch {meta['versions']['torch']}, dropreg_ext {meta['versions']['dropreg_ext']}; "
        f"last written {meta['date']}",
        f"- total elapsed: {meta['elapsed_seconds']:.0f} s ({meta['elapsed_seconds'] / 60:.1f} min) over all sittings, "
        "data loading and evaluation included",
        *_sitting_lines(meta),
        "",
        results_table(result, analysis),
        "",
        claims_table(result, analysis),
        "",
        f"Metric: {meta['metric']} ({'higher' if meta['higher_is_better'] else 'lower'} is better). {RULES} "
        "CPU time × dropout step: a run's training CPU seconds per step over the median CPU seconds of a dropout step "
        "measured at the start of the same sitting, in the same process (runs of other sittings ran under other "
        "load); " + (f"runs from before sittings were recorded (seeds {', '.join(map(str, untimed))}) have none."
                     if untimed else "every run has one."),
        "",
        f"![validation and test {meta['metric']} vs epoch, validation vs training CPU time]({image})",
        "",
    ])


RENDER_ORDER = ("cpu", "full", "quick")  # the runs sized to test the claims first


def folder_name(dataset: str, preset: str) -> str:
    """The results folder of a (dataset, preset) under the results root: ``ptb`` for --quick (the
    CI-sized runs), ``ptb-cpu`` and ``ptb-full`` for the others."""
    return dataset if preset == "quick" else f"{dataset}-{preset}"


def save(result: dict, folder: str) -> None:
    """Write ``folder/results.json`` with the per-method summary and the claims' analysis added."""
    os.makedirs(folder, exist_ok=True)
    result["summary"] = summarize(result)
    result["analysis"] = analyze(result)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


def render(root: str = RESULTS_ROOT) -> str:
    """From every ``root/<dataset>[-<preset>]/results.json``: refresh its summary and analysis (:func:`save`),
    write that folder's ``results.md`` and ``curves.png``, and regenerate the part of ``root/README.md``
    between the markers: the verdicts of every run, then each run's section (the text around it is kept;
    a missing README gets a stub). Returns the README's path."""
    parts, verdicts = [], []
    for preset in RENDER_ORDER:
        for dataset in DATASETS:
            name = folder_name(dataset, preset)
            folder = os.path.join(root, name)
            path = os.path.join(folder, "results.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                result = json.load(f)
            save(result, folder)
            with open(os.path.join(folder, "results.md"), "w") as f:
                f.write(dataset_markdown(result))
            plot_curves(result, os.path.join(folder, "curves.png"))
            parts.append(dataset_markdown(result, image=f"{name}/curves.png"))
            verdicts.append((name, result, result["analysis"]))
    summary = ["### Verdicts", "", verdict_summary(verdicts), "",
               "Each verdict comes from the tests stated under its run's claims table; the per-seed numbers and "
               "every test statistic are in that run's `results.json` (`runs`, `analysis`).", ""]
    generated = "\n".join([BEGIN, "", *(summary + parts if parts else ["(no results yet)", ""]), END])
    path = os.path.join(root, "README.md")
    text = open(path).read() if os.path.isfile(path) else f"# Reproduction results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1) if BEGIN in text else (text + "\n", END)
    tail = rest.split(END, 1)[1] if END in rest else "\n"
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        f.write(head + generated + tail)
    return path
