"""``python -m bench.gpu_summary DIR``: the one-screen summary of a ``bench/gpu_check.sh`` run.

Reads what the script left in DIR: ``machine.txt`` (its first lines), ``stages.tsv`` (one row per
stage: name, limit, seconds, exit status), ``junit/*.xml`` (one per test stage),
``bench-*/results.json`` (one benchmark section each) and ``kernels/kernels.json`` (device times).
Prints the stage table, the test counts with the first failures, for each benchmark section our
backends' share of the copy bandwidth and their speedups over eager PyTorch and torch.compile (the
training steps and where their time goes), the device times, and last the verdict: one PASS, FAIL
or MISSING line per GPU target (:func:`bench.checks.gpu_verdict`). Writes the same text to
``DIR/summary.txt``, and the sections as one ``DIR/results.json`` with their plots (the layout
``bench.report`` renders) and the verdict. Needs no torch: it must also summarize a run on a machine
where torch failed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ElementTree

from .checks import format_check, gpu_verdict, size_text

OURS = ("cuda", "triton", "cpu")
MAX_FAILURES = 12


def _status(rc: int) -> str:
    return {0: "ok", 5: "no tests", 124: "TIMEOUT", 130: "TIMEOUT", -1: "skipped"}.get(rc, f"FAILED ({rc})")


def stage_lines(folder: str) -> list:
    path = os.path.join(folder, "stages.tsv")
    if not os.path.exists(path):
        return ["(no stages.tsv)"]
    lines = [f"{'stage':<34} {'limit':>6} {'took':>6}  status"]
    with open(path) as f:
        for row in f:
            name, limit, seconds, rc = row.rstrip("\n").split("\t")
            lines.append(f"{name:<34} {limit + 's':>6} {seconds + 's':>6}  {_status(int(rc))}")
    return lines


def test_lines(folder: str) -> list:
    """Per junit file: counts; then the first failing test ids with the first line of their message."""
    lines, failures = [], []
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for path in sorted(glob.glob(os.path.join(folder, "junit", "*.xml"))):
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as exc:
            lines.append(f"{os.path.basename(path)}: unreadable ({exc})")
            continue
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in total}
        for key in total:
            total[key] += counts[key]
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        lines.append(f"{os.path.basename(path)[:-4]:<40} {passed:5d} passed {counts['failures'] + counts['errors']:4d} "
                     f"failed {counts['skipped']:5d} skipped")
        for case in root.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                message = (bad.get("message") or bad.text or "").strip().splitlines()
                failures.append(f"  {case.get('classname', '')}::{case.get('name', '')}: "
                                f"{message[0][:150] if message else ''}")
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    lines.append(f"{'all test files':<40} {passed:5d} passed {total['failures'] + total['errors']:4d} failed "
                 f"{total['skipped']:5d} skipped")
    if failures:
        lines.append(f"first failures ({min(len(failures), MAX_FAILURES)} of {len(failures)}):")
        lines += failures[:MAX_FAILURES]
    return lines


def train_lines(rows: list) -> list:
    """The training steps (ms per step, ratios), where the regularized steps' time goes, and the
    variants that failed."""
    lines = []
    for r in rows:
        if r["section"] == "train":
            ratios = "".join(f"  x {key.removeprefix('speedup_vs_')} {r[key]:.2f}" for key in
                             ("speedup_vs_eager", "speedup_vs_reg_plain", "speedup_vs_reg_fused") if key in r)
            lines.append(f"bench-train: {r['case']:<20} {r['provider']:<17} {r.get('precision', r['dtype']):<26} "
                         f"{r['median_ms']:8.2f} ms/step{ratios}")
        elif r["section"] == "train_phases":
            phases = "  ".join(f"{key} {value:.1f}" for key, value in r.items() if isinstance(value, float))
            lines.append(f"bench-train phases ({r.get('clock', 'host')} ms): {r['case']} {r['provider']}: {phases}")
        elif r["section"] == "train_error":
            lines.append(f"bench-train: {r['case']} {r['provider']} FAILED: {r['error']}")
    return lines


def bench_lines(folder: str) -> list:
    lines = []
    for path in sorted(glob.glob(os.path.join(folder, "bench-*", "results.json"))):
        with open(path) as f:
            rows = json.load(f)["rows"]
        section = os.path.basename(os.path.dirname(path))
        if section == "bench-train":
            lines += train_lines(rows)
            continue
        groups: dict = {}
        for r in rows:
            if r.get("provider") in OURS and "pct_copy" in r:
                groups.setdefault((r["dtype"], size_text(r), r["provider"]), []).append(r)
        for (dtype, size, provider), group in groups.items():
            modes = "  ".join(f"{r['mode']} {r['pct_copy']:.0f}%" for r in group)
            nan = float("nan")
            speedups = "  ".join(
                f"{r['mode']} x{r.get('speedup_vs_eager', nan):.2f}/x{r.get('speedup_vs_compile', nan):.2f}"
                for r in group
            )
            lines.append(f"{section}: {dtype} {size} {provider:<7} of copy: {modes} | vs eager/compile: {speedups}")
    return lines or ["(no benchmark results)"]


def merge_bench(folder: str) -> list:
    """The benchmark sections (``bench-*/results.json``) as one ``results.json`` in ``folder``, with
    their plots beside it: the layout of every results folder, which ``python -m bench.report``
    renders. Rows and checks are concatenated; the meta is the first section's, with the seconds
    of every section. Returns the sections merged."""
    paths = sorted(glob.glob(os.path.join(folder, "bench-*", "results.json")))
    if not paths:
        return []
    merged: dict = {"meta": {}, "rows": [], "checks": []}
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        meta = part.get("meta", {})
        if not merged["meta"]:
            merged["meta"] = dict(meta)
        else:
            merged["meta"].setdefault("elapsed_s", {}).update(meta.get("elapsed_s", {}))
        merged["rows"] += part["rows"]
        merged["checks"] += part.get("checks", [])
        for plot in glob.glob(os.path.join(os.path.dirname(path), "*.png")):
            shutil.copyfile(plot, os.path.join(folder, os.path.basename(plot)))
    sections = [os.path.basename(os.path.dirname(path)) for path in paths]
    merged["meta"]["command"] = f"bash bench/gpu_check.sh ({', '.join(sections)})"
    merged["verdict"] = verdict(folder)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(merged, f, indent=1)
    return sections


def _kernel_rows(folder: str) -> list:
    path = os.path.join(folder, "kernels", "kernels.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def _bench_rows(folder: str) -> list:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "bench-*", "results.json"))):
        with open(path) as f:
            rows += json.load(f)["rows"]
    return rows


def verdict(folder: str) -> list:
    """The GPU targets judged on what the run in ``folder`` measured (check dicts)."""
    return gpu_verdict(_bench_rows(folder), _kernel_rows(folder))


def verdict_lines(checks: list) -> list:
    counts = {status: sum(c["status"] == status for c in checks) for status in ("PASS", "FAIL", "MISSING")}
    head = (f"verdict (GPU targets of issues 25 and 26): {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
            f"{counts['MISSING']} MISSING")
    return [head] + [format_check(c) for c in checks]


def kernel_lines(folder: str) -> list:
    """The device times of ``python -m bench.gpu_kernels`` (``kernels/kernels.json``), if it ran."""
    rows = _kernel_rows(folder)
    if not rows:
        return []
    out = ["device time per call (CUDA graph replay; in brackets: back-to-back Python calls):"]
    for r in rows:
        if "error" in r:
            out.append(f"  {r['case']:<40} {r['error']}")
        else:
            python = f"  [{r['us_per_python_call']:.1f} us]" if "us_per_python_call" in r else ""
            out.append(f"  {r['case']:<40} {r['us_per_call']:9.1f} us {r['pct_copy']:5.0f}% of copy{python}")
    return out


def summary(folder: str) -> str:
    parts = []
    machine = os.path.join(folder, "machine.txt")
    if os.path.exists(machine):
        with open(machine) as f:
            parts += [line.rstrip() for line in f.readlines()[:4]]
    parts += [""] + stage_lines(folder) + [""] + test_lines(folder) + [""] + bench_lines(folder)
    kernels = kernel_lines(folder)
    parts += [""] + kernels if kernels else []
    tags = sorted({r["device_tag"] for r in _bench_rows(folder) if "device_tag" in r})
    parts += [""] + [f"to commit this run: rm -rf bench/results/{tag} && mkdir bench/results/{tag} && tar -xzf "
                     f"gpu_check.tgz -C bench/results/{tag} --exclude=./logs --exclude=./junit" for tag in tags]
    parts += [""] + verdict_lines(verdict(folder))
    return "\n".join(parts) + "\n"


def main(argv: list | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isdir(args[0]):
        print("usage: python -m bench.gpu_summary DIR  (the folder a bench/gpu_check.sh run wrote)", file=sys.stderr)
        return 2
    text = summary(args[0])
    with open(os.path.join(args[0], "summary.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    merged = merge_bench(args[0])
    if merged:
        print(f"results.json: {', '.join(merged)} merged (python -m bench.report renders it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
