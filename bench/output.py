"""What a run leaves behind: the stdout tables, ``results.json`` and ``results.csv``.

``results.json`` holds ``{"meta": {...}, "rows": [...], "checks": [...]}``; every row also carries
the device and version tags of :func:`bench.env.row_tags`, so ``results.csv`` (one line per row,
the union of the row fields as columns) is self-describing too.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional

from .checks import format_check
from .config import size_label

MIB = 2**20


def format_table(headers: list, rows: list, text_cols: int) -> str:
    """Fixed-width table: the first ``text_cols`` columns left-aligned, the (formatted) numbers
    after them right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list) -> str:
        pairs = enumerate(zip(cells, widths))
        return "  ".join(str(c).ljust(w) if i < text_cols else str(c).rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _num(value: Optional[float], fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def dropout_table(rows: list) -> str:
    headers = [
        "dtype", "n", "mode", "provider", "median ms", "p20-p80 ms", "reps",
        "eff GB/s", "own GB/s", "% copy", "x eager", "x compile", "peak MiB",
    ]  # fmt: skip
    body = [
        [
            r["dtype"],
            size_label(r["numel"]),
            r["mode"],
            r["provider"],
            f"{r['median_ms']:.3f}",
            f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            r["reps"],
            f"{r['gbps_eff']:.2f}",
            f"{r['gbps_own']:.2f}",
            f"{r['pct_copy']:.1f}",
            _num(r.get("speedup_vs_eager"), ".2f"),
            _num(r.get("speedup_vs_compile"), ".2f"),
            _num(r["peak_bytes"] / MIB if "peak_bytes" in r else None, ".2f"),
        ]
        for r in rows
        if r["section"] == "dropout"
    ]
    return format_table(headers, body, text_cols=4)


def train_table(rows: list) -> str:
    headers = [
        "case", "variant", "dtype", "unit", "median ms", "p20-p80 ms", "reps",
        "units/s", "peak MiB", "x eager",
    ]  # fmt: skip
    body = [
        [
            r["case"],
            r["provider"],
            r["dtype"],
            r["unit"],
            f"{r['median_ms']:.2f}",
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}",
            r["reps"],
            f"{r['throughput']:.0f}",
            f"{r['peak_bytes'] / MIB:.1f}",
            f"{r['speedup_vs_eager']:.2f}",
        ]
        for r in rows
        if r["section"] == "train"
    ]
    return format_table(headers, body, text_cols=4)


TABLE_NOTES = """\
eff GB/s: minimal bytes (fwd: read x + write y; bwd: read g + write dx) / median time, the same byte
count for every provider. own GB/s: the provider's real traffic (eager also stores a mask: 1 B/elem on
CUDA, a full noise tensor of x's dtype on CPU) / median time. % copy: eff GB/s / y.copy_(x) GB/s of the
same size, measured in this run. x eager, x compile: baseline median / this median, same mode, same run.
peak MiB: peak allocation of one fwd+bwd (or training step) above what was live before it."""


def print_report(result: dict) -> None:
    rows = result["rows"]
    if any(r["section"] == "dropout" for r in rows):
        print(f"\n== dropout, p={result['meta']['p']} ==")
        print(dropout_table(rows))
        print(TABLE_NOTES)
    if any(r["section"] == "train" for r in rows):
        print("\n== training steps (SGD step: forward, cross-entropy, backward, update) ==")
        print(train_table(rows))
    if result["checks"]:
        print(f"\n== acceptance checks (targets set for 2 CPU cores; device: {result['meta']['device']}) ==")
        for check in result["checks"]:
            print(format_check(check))


def write_results(result: dict, out_dir: str) -> list:
    """``results.json`` and ``results.csv`` in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    csv_path = os.path.join(out_dir, "results.csv")
    columns = list(dict.fromkeys(key for row in result["rows"] for key in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(result["rows"])
    return [json_path, csv_path]
