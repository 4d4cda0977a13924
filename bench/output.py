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

from .checks import REG_FUSED_GRAPH, case_cells, format_check
from .train import cuda_only_variants

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


def op_table(rows: list, section: str) -> str:
    """The per-op table of ``section`` ("dropout", "ce" or "site"); the own-GB/s column only where
    the section counts each provider's own traffic (dropout)."""
    rows = [r for r in rows if r["section"] == section]
    own = any("gbps_own" in r for r in rows)
    kinds = section == "kinds"
    headers = [
        *(["case"] if kinds else []), "dtype", "N x C" if section == "ce" else "n", "mode", "provider", "median ms",
        "p20-p80 ms", "reps", "eff GB/s", *(["own GB/s"] if own else []), "% copy", "of floor", "x eager",
        "x compile", "peak MiB",
    ]  # fmt: skip
    body = [
        [
            *([r["case"]] if kinds else []),
            *case_cells(r),
            f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            r["reps"],
            f"{r['gbps_eff']:.2f}",
            *([f"{r['gbps_own']:.2f}"] if own else []),
            f"{r['pct_copy']:.1f}",
            _num(r.get("of_floor"), ".2f"),
            _num(r.get("speedup_vs_eager"), ".2f"),
            _num(r.get("speedup_vs_compile"), ".2f"),
            _num(r["peak_bytes"] / MIB if "peak_bytes" in r else None, ".2f"),
        ]
        for r in rows
    ]
    return format_table(headers, body, text_cols=5 if kinds else 4)


def overhead_table(rows: list) -> str:
    headers = ["call", "torch us", "ours us", "ours / torch", "torch ops", "ours ops", "ours dispatches"]
    body = [
        [r["case"], f"{r['torch_us']:.2f}", f"{r['ours_us']:.2f}", f"{r['ratio']:.2f}",
         f"{r['torch_ops_fwd']}+{r['torch_ops_bwd']}", f"{r['ours_ops_fwd']}+{r['ours_ops_bwd']}", r["ours_ops"]]
        for r in rows if r["section"] == "overhead"
    ]
    return format_table(headers, body, text_cols=1)


OVERHEAD_NOTES = """torch: F.dropout, nn.Dropout, F.cross_entropy; site fwd+bwd is compared with F.dropout fwd+bwd.
ops: tensor ops dispatched below autograd, forward + backward (each one launch at least on a GPU)."""


def train_table(rows: list) -> str:
    headers = [
        "case", "variant", "precision", "unit", "median ms", "p20-p80 ms", "reps",
        "units/s", "peak MiB", "x eager", "x reg_plain",
    ]  # fmt: skip
    body = [
        [
            r["case"],
            r["provider"],
            r.get("precision", r["dtype"]),  # rows from before autocast: the parameters' dtype throughout
            r["unit"],
            f"{r['median_ms']:.2f}",
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}",
            r["reps"],
            f"{r['throughput']:.0f}",
            f"{r['peak_bytes'] / MIB:.1f}",
            f"{r['speedup_vs_eager']:.2f}",
            _num(r.get("speedup_vs_reg_plain"), ".2f"),
        ]
        for r in rows
        if r["section"] == "train"
    ]
    return format_table(headers, body, text_cols=4)


PHASE_COLUMNS = ("forward", "objective", "first-order VJPs", "backward", "optimizer", "our kernels", "matmuls")


def phase_table_rows(rows: list) -> tuple:
    """(headers, body) of the regularized steps' phases (bench.train.phase_rows), ms per step."""
    headers = ["case", "variant", "clock", *PHASE_COLUMNS]
    body = [[r["case"], r["provider"], r.get("clock", "host"), *(f"{r[c]:.1f}" for c in PHASE_COLUMNS)]
            for r in rows if r["section"] == "train_phases"]
    return headers, body


PHASE_NOTES = """\
ms per step under torch.profiler: the model's forward; the objective (loss and terms, of which the
first-order VJPs: the autograd.grad calls giving the gradients at the sites); the backward (a double
backward); the SGD update. our kernels: the dropreg:: ops in all phases; matmuls: aten::mm/addmm/bmm/matmul
in all phases. clock host (CPU): wall time of each range and the ops' own time, the profiler's overhead
included; clock device (GPU): the device time of the kernels launched in each range or by those ops."""


def regularizer_headlines(rows: list) -> list:
    """Per training case: the fused regularized step vs the plain-autograd one, and its cost in
    plain (eager ``nn.Dropout``) dropout steps of the same model."""
    steps = {(r["case"], r["provider"]): r for r in rows if r["section"] == "train"}
    lines = []
    for r in rows:
        if r["section"] == "train" and r["provider"] == "reg_fused" and "speedup_vs_reg_plain" in r:
            generic = steps.get((r["case"], "reg_fused_generic"), {})
            without_head = (f" ({generic['speedup_vs_reg_plain']:.2f}x without head=)"
                            if "speedup_vs_reg_plain" in generic else "")
            captured = steps.get((r["case"], REG_FUSED_GRAPH), {})
            in_graph = (f"; captured in a CUDA graph, {captured['speedup_vs_reg_fused']:.2f}x as fast as reg_fused"
                        if "speedup_vs_reg_fused" in captured else "")
            lines.append(
                f"{r['case']}: reg_fused is {r['speedup_vs_reg_plain']:.2f}x as fast as reg_plain{without_head}; "
                f"one reg_fused step costs {1 / r['speedup_vs_eager']:.2f} eager dropout steps{in_graph}"
            )
    return lines


def train_notes(rows: list, meta: dict) -> list:
    """What the training table leaves out and why: the variants that run on CUDA only (on another
    device) and the variants that failed on the GPU (``train_error`` rows)."""
    lines = []
    ran = {r["case"] for r in rows if r["section"] == "train"}
    for case, variant in cuda_only_variants():
        if case in ran and meta["device_type"] != "cuda":
            lines.append(f"{case}: {variant} runs on CUDA only: not run on {meta['device_type']}")
    lines += [f"{r['case']}: {r['provider']} failed: {r['error']}" for r in rows if r["section"] == "train_error"]
    return lines


def dropout_memory_headlines(rows: list) -> list:
    """Per training case with both: our dropout's step against torch's (``dropreg`` vs ``eager``), in
    peak memory above the model and in median step time."""
    steps = {(r["case"], r["provider"]): r for r in rows if r["section"] == "train"}
    lines = []
    for (case, provider), ours in steps.items():
        torch_row = steps.get((case, "eager"))
        if provider != "dropreg" or torch_row is None:
            continue
        saved = torch_row["peak_bytes"] - ours["peak_bytes"]
        share = 100 * saved / max(torch_row["peak_bytes"], 1)
        lines.append(
            f"{case}: peak {ours['peak_bytes'] / MIB:.1f} MiB with ours vs {torch_row['peak_bytes'] / MIB:.1f} MiB "
            f"with torch's dropout ({saved / MIB:+.1f} MiB saved, {share:.0f}%); "
            f"step {ours['median_ms']:.0f} ms vs {torch_row['median_ms']:.0f} ms ({ours['speedup_vs_eager']:.2f}x)"
        )
    return lines


TABLE_NOTES = """\
eff GB/s: minimal bytes (fwd: read x + write y; bwd: read g + write dx) / median time, the same byte
count for every provider. own GB/s: the provider's real traffic (eager also stores a mask: 1 B/elem on
CUDA, a full noise tensor of x's dtype on CPU) / median time. % copy: eff GB/s / y.copy_(x) GB/s of the
same size, measured in this run. of floor: the floor's median / this median, same mode (floor: a fresh
torch.mul per pass, mul_ for inplace: the cheapest op moving the same bytes; 1.0 = at the floor).
x eager, x compile: baseline median / this median, same mode, same run.
peak MiB: peak allocation of one fwd+bwd (or training step) above what was live before it."""

CE_NOTES = """\
sample+grad: per-row loss CE(z, y), ŷ ~ softmax(z) and G = softmax(z) - onehot(ŷ) from z (N x C).
ours: cross_entropy_sample_grad (one op, z read once); <ours>-2op: cross_entropy_sample + ce_grad (z read
twice); eager: F.cross_entropy + softmax + multinomial + one_hot + (p - onehot); compile: torch.compile of
eager. eff GB/s counts read z + write G = 2 x itemsize x N x C bytes, for every provider. % copy vs
out.copy_(z) (the same bytes). of floor: vs torch.mul(z, z2) (two reads of N x C and a fresh write);
floor-warm: that product into an output already mapped (the bytes without the page faults). peak MiB: one
call, outputs included."""

SITE_NOTES = """\
[Σ (g_e h)², Σ g_i η h] with Rademacher η; eager draws η with torch.randint. eff GB/s counts fwd: read h,
g_e, g_i (3 x itemsize per element); fwd+bwd adds a read of the three and a write of their gradients (9 x).
of floor: vs the sums of h, g_e, g_i (fwd), plus a fresh torch.mul of each (fwd+bwd)."""

# The per-op sections of the report, in print order: section, heading (formatted with the run's meta),
# the notes printed below the table.
OP_SECTIONS = (
    ("dropout", "dropout, p={p}", TABLE_NOTES),
    ("kinds", "dropout kinds and layouts, vs the floor (fresh torch.mul on the same tensor)", None),
    ("ce", "cross-entropy + sampled label + gradient", CE_NOTES),
    ("site", "site penalty, q={p}", SITE_NOTES),
)


def print_report(result: dict) -> None:
    rows = result["rows"]
    sections = {r["section"] for r in rows}
    for section, heading, notes in OP_SECTIONS:
        if section in sections:
            print(f"\n== {heading.format(**result['meta'])} ==")
            print(op_table(rows, section))
            if notes:
                print(notes)
    if "overhead" in sections:
        print("\n== host cost per call (16 elements, 1 thread, interleaved medians) ==")
        print(overhead_table(rows))
        print(OVERHEAD_NOTES)
    if "train" in sections:
        print("\n== training steps (SGD step: forward, loss, backward, update) ==")
        print(train_table(rows))
        print("reg_plain / reg_fused: dropout's explicit (sampled ŷ) + implicit regularizer instead of dropout,")
        print("plain autograd (dropreg_ext.reference.regularizer_objective) / dr.DropoutRegularizer(head=the output")
        print("layer); reg_fused_generic: dr.DropoutRegularizer without head=.")
        print("reg_fused_graph: the reg_fused step (forward, loss, backward, SGD update) captured in one CUDA graph")
        print("and replayed (CUDA only). precision: float32 throughout, or on a GPU the forward and loss under")
        print("autocast, TF32 for the float32 matrix products left.")
        print("x eager: vs the eager nn.Dropout step of the same model; x reg_plain: vs the plain regularized step.")
        for line in regularizer_headlines(rows) + dropout_memory_headlines(rows) + train_notes(rows, result["meta"]):
            print("  " + line)
    if "train_phases" in sections:
        print("\n== where a regularized step's time goes ==")
        print(format_table(*phase_table_rows(rows), text_cols=2))
        print(PHASE_NOTES)
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
