"""``python -m bench [--quick|--check|--full] [--only SECTION] [--device cpu|cuda] [--out DIR | --refresh]``

Runs the per-op benchmarks (dropout, dropout kinds and layouts, cross-entropy with a sampled label,
site penalty), the host cost of each public call against torch's (overhead) and the
training-step benchmark (dropout and the dropout regularizer), prints the tables and the
acceptance checks, and writes ``results.json``, ``results.csv`` and PNG plots to
``bench/out/<device-tag>/`` (not tracked by git), to the committed ``bench/results/<device-tag>/``
with ``--refresh``, or to ``--out``. ``--quick`` (default) fits in 5 minutes on 2 CPU cores;
``--check`` is the short GPU run of bench/gpu_check.sh; ``--full`` is for GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

import torch
from tqdm import tqdm

from . import ce, checks, dropout, dropout_kinds, env, output, overhead, plots, site_penalty, train
from .checks import size_label
from .config import Config, make_config

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_ROOT = os.path.join(BENCH_DIR, "results")  # the committed results
OUT_ROOT = os.path.join(BENCH_DIR, "out")  # default: a run leaves the tree clean (.gitignore)
SECTIONS = {
    "dropout": dropout, "kinds": dropout_kinds, "ce": ce, "site": site_penalty, "overhead": overhead, "train": train,
}


def parse_args(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick", help="default")
    preset.add_argument("--check", dest="preset", action="store_const", const="check",
                        help="a few GPU sizes per section (bench/gpu_check.sh)")
    preset.add_argument("--full", dest="preset", action="store_const", const="full", help="GPU sizes")
    parser.set_defaults(preset="quick")
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", help="output folder (default bench/out/<device-tag>, not tracked by git)")
    target.add_argument("--refresh", action="store_true",
                        help="write the committed results, bench/results/<device-tag> (then python -m bench.report)")
    return parser.parse_args(argv)


def resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "python -m bench: --device cuda was asked for but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})"
        )
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Progress:
    """A tqdm bar over the run's units (one dropout case, one training case); ``progress(label)``
    marks the previous unit done and names the next. tqdm hides it when stderr is not a terminal."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, unit="case", disable=None, dynamic_ncols=True)
        self.started = False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_description(label)

    def close(self) -> None:
        if self.started:
            self.bar.update()
        self.bar.close()


def _units(section: str, cfg: Config) -> int:
    if section == "train":
        return len(train.CASES)
    return len(SECTIONS[section].case_keys(cfg))


def build_result(cfg: Config, tags: dict, meta: dict, rows: list, elapsed: dict, load_start: float) -> dict:
    """The content of results.json: run settings (``meta``, :func:`describe` at the start), tagged
    rows, acceptance checks. The 1-minute load average at the start and now says how busy a shared
    machine was during the run."""
    rows = [{**tags, **row} for row in rows]
    return {
        "meta": {**meta, "elapsed_s": elapsed, "load_avg_1min": [load_start, env.load_average()]},
        "rows": rows,
        "checks": checks.acceptance(rows, cfg.device.type),
    }


def run_sections(names: list, cfg: Config, tags: dict, out_dir: str) -> dict:
    """Runs the sections; results.json/csv are rewritten after each one, before each unit and on an
    interrupt (a section's ``run`` may yield its rows one by one, as the training section does), so a
    run cut short by a time limit (bench/gpu_check.sh sends SIGINT) still leaves what it measured."""
    rows, elapsed, load_start = [], {}, env.load_average()
    # Described once, before the first write: a refresh writes into the tracked results, which would
    # make the tree look dirty to every later write.
    meta = describe(cfg, tags)
    progress = Progress(sum(_units(name, cfg) for name in names))

    def write() -> None:
        output.write_results(build_result(cfg, tags, meta, rows, elapsed, load_start), out_dir)

    def write_then_progress(label: str) -> None:
        write()
        progress(label)

    try:
        for name in names:
            start = time.perf_counter()
            for row in SECTIONS[name].run(cfg, write_then_progress):
                rows.append(row)
            elapsed[name] = time.perf_counter() - start
            planned = f" (planned {cfg.budget_s[name]} s)" if name in cfg.budget_s else ""
            tqdm.write(f"[{name}] {elapsed[name]:.1f} s{planned}; load average {env.load_average()}")
            write()
    except KeyboardInterrupt:  # gpu_check.sh's time limit (timeout -s INT): keep the rows measured so far
        write()
        raise
    finally:
        progress.close()
    return build_result(cfg, tags, meta, rows, elapsed, load_start)


def describe(cfg: Config, tags: dict) -> dict:
    return {
        **tags,
        "preset": cfg.preset,
        "device_type": cfg.device.type,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": env.omp_wait_policy(),
        "p": cfg.p,
        "sizes": cfg.sizes,
        "ce_shapes": cfg.ce_shapes,
        "ce_floor": "torch.mul(z, z2)",  # results without this key were measured against torch.add(z, z2)
        "site_sizes": cfg.site_sizes,
        "op_reps": dataclasses.asdict(cfg.op_reps),
        "ce_reps": dataclasses.asdict(cfg.ce_reps),
        "train_reps": dataclasses.asdict(cfg.train_reps),
        "train_scale": cfg.train_scale,
        "budget_s": cfg.budget_s,
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
        # The CPU kernels' vector loops, and the cap that chose them where one was set.
        "cpu_path": env.cpu_path(),
        "cpu_capability_cap": os.environ.get("DROPREG_CPU_CAPABILITY", "-"),
        **env.git_state(),
    }


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def main(argv: list | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # cpp_extension warns on every torch.compile of a CPU-only machine that no CUDA runtime exists.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    device = resolve_device(args.device)
    cfg = make_config(args.preset, device)
    tags = env.row_tags(device)
    out_dir = args.out or os.path.join(RESULTS_ROOT if args.refresh else OUT_ROOT, tags["device_tag"])
    names = [args.only] if args.only else list(SECTIONS)
    print(f"bench --{cfg.preset} on {tags['device']} [{tags['device_tag']}]")
    print(f"{env.versions_line(tags)}, {tags['date']}")
    print("dropout sizes: " + "; ".join(f"{d} {', '.join(map(size_label, s))}" for d, s in cfg.sizes.items()))
    print("ce (N, C): " + "; ".join(f"{d} {', '.join(f'{n}x{c}' for n, c in s)}" for d, s in cfg.ce_shapes.items()))
    print("site sizes: " + "; ".join(f"{d} {', '.join(map(size_label, s))}" for d, s in cfg.site_sizes.items()))
    print(f"our backends on {device.type}: {dropout.our_backends(device)}; {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={env.omp_wait_policy()}; output: {out_dir}")

    start = time.perf_counter()
    result = run_sections(names, cfg, tags, out_dir)
    output.print_report(result)
    paths = output.write_results(result, out_dir) + plots.write_plots(result, out_dir)
    print("\nwrote " + ", ".join(_short(p) for p in paths))
    sections = ", ".join(f"{name} {sec:.1f} s" for name, sec in result["meta"]["elapsed_s"].items())
    load = result["meta"]["load_avg_1min"]
    print(f"elapsed: {sections}; total {time.perf_counter() - start:.1f} s; load average {load[0]} -> {load[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
