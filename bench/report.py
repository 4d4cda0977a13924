"""Render the results tables of ``bench/results/README.md`` from the ``results.json`` files.

    python -m bench.report                  # rewrite the generated part of bench/results/README.md
    python -m bench.report --print DIR ...  # print the section of each results folder, write nothing

Every number in the README comes from a ``results.json`` through this script, so none is edited
by hand. The generated part sits between the two marker lines :data:`BEGIN` and :data:`END`; the
rest of the README is left as written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .checks import case_cells, format_check
from .output import PHASE_NOTES, dropout_memory_headlines, phase_table_rows, regularizer_headlines

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README = os.path.join(RESULTS_ROOT, "README.md")
BEGIN = "<!-- BEGIN GENERATED RESULTS: `python -m bench.report` writes this part; do not edit by hand -->"
END = "<!-- END GENERATED RESULTS -->"


def markdown_table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _opt(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else ""


HEADLINE_HEADERS = ["dtype", "size", "mode", "provider", "median ms", "eff GB/s", "of copy", "x eager", "x compile",
                    "peak MiB"]  # fmt: skip


def _headline_table(rows: list, size_header: str) -> str:
    body = [
        [
            *case_cells(r),
            f"{r['gbps_eff']:.3g}",
            f"{r['pct_copy']:.0f}%",
            _opt(r, "speedup_vs_eager", ".2f"),
            _opt(r, "speedup_vs_compile", ".2f"),
            f"{r['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in r else "",
        ]
        for r in rows
    ]
    return markdown_table([size_header if h == "size" else h for h in HEADLINE_HEADERS], body)


def dropout_headline(rows: list) -> str:
    """Every provider at the largest n measured for each dtype."""
    rows = [r for r in rows if r["section"] == "dropout"]
    largest = {}
    for r in rows:
        largest[r["dtype"]] = max(largest.get(r["dtype"], 0), r["numel"])
    return _headline_table([r for r in rows if r["numel"] == largest[r["dtype"]]], "n")


def op_headline(rows: list, section: str) -> str:
    """Every provider of ``section`` ("ce" or "site") at every size measured."""
    return _headline_table([r for r in rows if r["section"] == section], "N x C" if section == "ce" else "n")


def train_headline(rows: list) -> str:
    body = [
        [
            r["case"],
            r["provider"],
            f"{r['throughput']:.0f} {r['unit']}/s",
            f"{r['median_ms']:.1f}",
            f"{r['peak_bytes'] / 2**20:.1f}",
            f"{r['speedup_vs_eager']:.2f}",
            _opt(r, "speedup_vs_reg_plain", ".2f"),
        ]
        for r in rows
        if r["section"] == "train"
    ]
    headers = ["case", "variant", "throughput", "median step ms", "peak MiB", "x eager", "x reg_plain"]
    return markdown_table(headers, body)


def commit_text(meta: dict) -> str:
    """"commit abc1234" (", uncommitted changes" when the tree was dirty) from a results meta; results
    written before the meta recorded it say so."""
    if meta.get("commit") is None:
        return "commit not recorded"
    return f"commit {meta['commit'][:7]}" + (" with uncommitted changes" if meta.get("dirty") else "")


def render_section(result: dict, folder: str, link: str) -> str:
    """The README section of the results folder ``folder``; images are linked as ``link/<png>``."""
    meta, rows = result["meta"], result["rows"]
    parts = [
        f"### {os.path.basename(os.path.normpath(folder))}",
        "",
        f"- device: {meta['device']}",
        f"- versions: torch {meta['torch']}, triton {meta['triton']}, dropreg_ext {meta['dropreg_ext']}; "
        f"{commit_text(meta)}",
        f"- date: {meta['date']}; command: `{meta['command']}`; p = {meta['p']}"
        + (f"; CPU loops: {meta['cpu_path']} (DROPREG_CPU_CAPABILITY={meta['cpu_capability_cap']})"
           if meta.get("device_type", "cpu") == "cpu" and "cpu_path" in meta else ""),
        "- time per section: " + ", ".join(f"{k} {v:.0f} s" for k, v in meta["elapsed_s"].items())
        + f"; 1-min load average at start / end: {' / '.join(map(str, meta.get('load_avg_1min', [])))}"
        + f" on {meta['threads']} threads (OMP_WAIT_POLICY={meta.get('omp_wait_policy', '-')})",
    ]
    if any(r["section"] == "dropout" for r in rows):
        title = "Dropout at the largest size of each dtype (eff GB/s: minimal bytes / median time):"
        parts += ["", title, "", dropout_headline(rows)]
    if any(r["section"] == "ce" for r in rows):
        title = ("Cross-entropy + sampled label + gradient (eff GB/s: 2 x itemsize x N x C bytes, read z and"
                 f" write G once, / median time; floor: {meta.get('ce_floor', 'torch.add(z, z2)')}, floor-warm:"
                 " the same into mapped pages):")  # fmt: skip
        parts += ["", title, "", op_headline(rows, "ce")]
    if any(r["section"] == "site" for r in rows):
        title = "Site penalty [Σ (g_e h)², Σ g_i η h] (eff GB/s: 3 (fwd) or 9 (fwd+bwd) x itemsize x n bytes):"
        parts += ["", title, "", op_headline(rows, "site")]
    if result.get("checks"):
        parts += ["", "Acceptance checks (targets set for 2 CPU cores):", "", "```"]
        parts += [format_check(c).strip() for c in result["checks"]] + ["```"]
    if any(r["section"] == "train" for r in rows):
        parts += ["", "Training steps:", "", train_headline(rows)]
        parts += ["", "Our dropout against torch's in the same model (peak memory above the model, step time):", ""]
        parts += [f"- {h}" for h in dropout_memory_headlines(rows)]
        headlines = regularizer_headlines(rows)
        if headlines:
            parts += ["", "Regularized steps (explicit sampled + implicit):", ""] + [f"- {h}" for h in headlines]
    if any(r["section"] == "train_phases" for r in rows):
        parts += ["", "Where a regularized step's time goes:", "", markdown_table(*phase_table_rows(rows)), ""]
        parts += [" ".join(PHASE_NOTES.split("\n"))]
    plots = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    parts += [""] + [f"![{p}]({link}/{p})" for p in plots]
    return "\n".join(parts).rstrip() + "\n"


def load(folder: str) -> dict:
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def result_folders(root: str) -> list:
    return sorted(
        name for name in os.listdir(root) if os.path.isfile(os.path.join(root, name, "results.json"))
    )


def update_readme(root: str = RESULTS_ROOT, readme: str = README) -> None:
    """Replace the text between the markers of ``readme`` with a section per results folder."""
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} lacks the marker lines; restore them:\n{BEGIN}\n{END}")
    sections = []
    for name in result_folders(root):
        folder = os.path.join(root, name)
        sections.append(render_section(load(folder), folder, name))
    body = "\n".join(sections) if sections else "No results yet: run `python -m bench`.\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(readme, "w") as f:
        f.write(f"{head}{BEGIN}\n\n{body}\n{END}{tail}")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--print", nargs="+", metavar="DIR", dest="folders",
        help="print the sections of these results folders instead of updating the README",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.folders:
        for folder in args.folders:
            print(render_section(load(folder), folder, folder))
        return 0
    update_readme()
    print(f"updated {os.path.relpath(README)} from {', '.join(result_folders(RESULTS_ROOT)) or 'no results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
