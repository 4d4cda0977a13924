"""The issue's acceptance checks, computed from the rows of one run.

Stated for a 2-core CPU, "ours" being the C++ backend:

1. dropout at n = 2^24 float32: ours fwd+bwd is at least 3x faster than eager;
2. ... ours fwd is at least 2x faster than torch.compile's fwd;
3. ... the peak memory of ours fwd+bwd is at least n bytes (one bool mask) below eager's;
4. cross-entropy + sampling (loss, ŷ, softmax - onehot(ŷ)) at N = 2048, C = 10k float32: ours is at
   least 5x faster than eager;
5. regularized training step (explicit="sampled" + implicit), LSTM language model: the fused
   ``DropoutRegularizer`` step is at least 2x faster than the plain-autograd one;
6. ... MLP: fused not slower than plain (ratio >= 1.0);
7. ... peak memory of the fused step <= the plain one's, LSTM language model and MLP;
8. dropout at 2^24, float32 and bfloat16: ours fwd and fwd+bwd at least 0.85 of the floor (a fresh
   torch.mul per pass), in place at least 0.4 of mul_;
9. a channels_last input at least 0.85 of its floor, channel and locked dropout at least 0.8;
10. cross-entropy + sampling + gradient at N = 2048, C = 10k, float32 and bfloat16, and at N = 512,
    C = 50257 float32: the fused op (``cross_entropy_sample_grad``) at least 0.7 of its floor
    (torch.mul of two N x C tensors: two reads and a fresh write), and so is the two-op path
    (``cross_entropy_sample`` + ``ce_grad``) at N = 2048, C = 10k float32;
11. site penalty fwd+bwd at 2^22 float32: at least 0.8 of its floor (three reads, then three more
    reads and three fresh writes);
12. on a GPU, the fused cross-entropy op at C >= 32k at least 80% of the copy bandwidth (reported
    with the other GPU figures as INFO);
13. host cost per call on 16-element tensors, 1 thread (bench.overhead): torch's time / ours at least
    1.0 for dropout fwd, dropout fwd+bwd, the Dropout module fwd+bwd and the fused cross-entropy
    fwd+bwd; F.dropout fwd+bwd / the site penalty fwd+bwd at least 1/1.5. The host path does not
    depend on the device, so these are checked on every device.

A section that did not run (``--only``) contributes no checks. On other devices the same numbers
are computed for the device's native backend and reported as ``INFO``: the targets were set for
the CPU.

The GPU's own targets (issues 25 and 26), judged by :func:`gpu_verdict` over one
``bench/gpu_check.sh`` run (its sections' rows and ``python -m bench.gpu_kernels``' device times):

- dropout fwd+bwd of the cuda backend, timed as users call it (Python calls, ``python -m bench
  --check``): at least eager's speed at every size from 2^20 to 2^26 and 0.9x at 2^16, float32 and
  bfloat16;
- the GPT-2 small regularized step (bfloat16 autocast, ``head=``) at most 2.5 eager dropout steps and at
  least 1.2x the plain-autograd one; the LSTM-LM regularized step captured in a CUDA graph at least 2x
  the same step uncaptured;
- device time (CUDA-graph replays): dropout at least 90% of the copy's bandwidth at 2^24 and above
  (float32 and bfloat16, forward and forward+backward), the fused cross-entropy + sample + gradient at
  least 80% at C >= 32k, the site penalty forward and backward at least 80%, every Triton case at most
  1.2x the time of the same case on the cuda backend;
- the host cost per call (``--only overhead``), as check 13 above.

Needs no torch: the summary of a GPU run must work where torch failed.
"""

from __future__ import annotations

from typing import Optional

CHECK_NUMEL = 2**24
CHECK_DTYPE = "float32"
CHECK_CE = (2048, 10_000)  # (N, C)
# bench.train's variant and case names (defined here, where no torch is imported: bench.gpu_summary
# judges a GPU run without it).
EAGER, DROPREG, REG_PLAIN, REG_FUSED = "eager", "dropreg", "reg_plain", "reg_fused"
REG_FUSED_GENERIC, REG_FUSED_GRAPH = "reg_fused_generic", "reg_fused_graph"
LSTM_CASE, GPT2_REG_CASE = "lstm_lm", "gpt2_regularized"
WHOLE_CASE = "case"  # the variant of a train_error row whose whole case failed
REG_SPEEDUP_TARGETS = {LSTM_CASE: 2.0, "mlp": 1.0}
CE_FLOOR_CASES = (("float32", 2048, 10_000), ("bfloat16", 2048, 10_000), ("float32", 512, 50_257))
GPU_CE_COPY_TARGET, GPU_CE_MIN_CLASSES = 80.0, 32_000  # percent of the copy's GB/s, at C >= 32k


def size_label(numel: int) -> str:
    """``65536`` -> ``"2^16"`` (other numbers as they are)."""
    return f"2^{numel.bit_length() - 1}" if numel > 0 and numel & (numel - 1) == 0 else str(numel)


def size_text(row: dict) -> str:
    """``2^24`` for an elementwise case, ``2048x10000`` (N x C) for a cross-entropy case."""
    return f"{row['rows']}x{row['classes']}" if "classes" in row else size_label(row["numel"])


def case_cells(row: dict) -> list:
    """The first cells of an op table's row: dtype, size, mode, provider and the median in ms."""
    return [row["dtype"], size_text(row), row["mode"], row["provider"], f"{row['median_ms']:.3f}"]


def native_backend(device_type: str) -> str:
    return "cuda" if device_type == "cuda" else "cpu"


def _find(rows: list, provider: str, mode: str, dtype: str = CHECK_DTYPE, numel: int = CHECK_NUMEL) -> Optional[dict]:
    for row in rows:
        key = (row["section"], row.get("provider"), row.get("mode"), row.get("dtype"), row.get("numel"))
        if key == ("dropout", provider, mode, dtype, numel):
            return row
    return None


def _floor_check(name: str, target: float, row: Optional[dict]) -> dict:
    if row is None or "of_floor" not in row:
        return {"check": name, "measured": None, "target": target, "unit": "x", "detail": "not measured"}
    detail = f"{row['provider']} {row['median_ms']:.2f} ms, floor {row['median_ms'] * row['of_floor']:.2f} ms"
    return {"check": name, "measured": row["of_floor"], "target": target, "unit": "x", "detail": detail}


CE_FLOOR_TARGET = 0.7  # cross-entropy + sampling + gradient, fraction of its floor
SITE_FLOOR_TARGET, SITE_CHECK_NUMEL = 0.8, 2**22  # site penalty fwd+bwd
FLOOR_TARGETS = {"fwd": 0.85, "fwd+bwd": 0.85, "inplace": 0.4}  # fraction of the floor, at 2^24
KIND_TARGETS = {"channels_last": 0.85, "dropout2d": 0.8, "locked": 0.8}


def _floor_checks(rows: list, ours: str) -> list:
    checks = []
    for dtype in ("float32", "bfloat16"):
        for mode, target in FLOOR_TARGETS.items():
            name = f"dropout {mode} of '{ours}' at 2^24 {dtype}, fraction of its floor"
            checks.append(_floor_check(name, target, _find(rows, ours, mode, dtype)))
    return checks


def _kind_checks(rows: list) -> list:
    checks = []
    for kind, target in KIND_TARGETS.items():
        for mode in ("fwd", "fwd+bwd"):
            row = next((r for r in rows if (r["section"], r["case"], r["provider"], r["mode"]) ==
                        ("kinds", kind, "ours", mode)), None)
            checks.append(_floor_check(f"{kind} {mode} of ours, fraction of its floor", target, row))
    return checks


def _find_ce(rows: list, provider: str, dtype: str = CHECK_DTYPE, shape: tuple = CHECK_CE) -> Optional[dict]:
    for row in rows:
        key = (row["section"], row["provider"], row["dtype"], row.get("rows"), row.get("classes"))
        if key == ("ce", provider, dtype, *shape):
            return row
    return None


def _find_train(rows: list, case: str, variant: str) -> Optional[dict]:
    return next((r for r in rows if (r["section"], r.get("case"), r.get("provider")) == ("train", case, variant)),
                None)


def _ratio_check(name: str, target: float, base: Optional[dict], ours: Optional[dict]) -> dict:
    if base is None or ours is None:
        return {"check": name, "measured": None, "target": target, "unit": "x", "detail": "not measured"}
    ratio = base["median_ms"] / ours["median_ms"]
    detail = f"{base['provider']} {base['median_ms']:.2f} ms / {ours['provider']} {ours['median_ms']:.2f} ms"
    return {"check": name, "measured": ratio, "target": target, "unit": "x", "detail": detail}


def _memory_check(name: str, target: float, base: Optional[dict], ours: Optional[dict]) -> dict:
    """Bytes of peak memory saved by ``ours`` relative to ``base`` (positive: ours uses less)."""
    if base is None or ours is None or "peak_bytes" not in base or "peak_bytes" not in ours:
        return {"check": name, "measured": None, "target": target, "unit": "B", "detail": "not measured"}
    saved = base["peak_bytes"] - ours["peak_bytes"]
    detail = (
        f"{base['provider']} peak {base['peak_bytes'] / 2**20:.1f} MiB, "
        f"{ours['provider']} {ours['peak_bytes'] / 2**20:.1f} MiB"
    )
    return {"check": name, "measured": float(saved), "target": target, "unit": "B", "detail": detail}


def _dropout_checks(rows: list, ours: str) -> list:
    eager_fb, ours_fb = _find(rows, "eager", "fwd+bwd"), _find(rows, ours, "fwd+bwd")
    compile_f, ours_f = _find(rows, "compile", "fwd"), _find(rows, ours, "fwd")
    return [
        _ratio_check(f"fwd+bwd speedup of '{ours}' vs eager", 3.0, eager_fb, ours_fb),
        _ratio_check(f"fwd speedup of '{ours}' vs torch.compile", 2.0, compile_f, ours_f),
        _memory_check(f"fwd+bwd peak memory saved by '{ours}' vs eager", float(CHECK_NUMEL), eager_fb, ours_fb),
    ]


def _ce_checks(rows: list, ours: str, device_type: str) -> list:
    n, c = CHECK_CE
    name = f"ce+sample+grad speedup of '{ours}' vs eager at N={n}, C={c} {CHECK_DTYPE}"
    checks = [_ratio_check(name, 5.0, _find_ce(rows, "eager"), _find_ce(rows, ours))]
    for dtype, rows_n, classes in CE_FLOOR_CASES:
        name = f"ce+sample+grad of '{ours}' at N={rows_n}, C={classes} {dtype}, fraction of its floor"
        checks.append(_floor_check(name, CE_FLOOR_TARGET, _find_ce(rows, ours, dtype, (rows_n, classes))))
    two_ops = f"{ours}-2op"
    name = f"ce+sample+grad of '{two_ops}' at N={n}, C={c} {CHECK_DTYPE}, fraction of its floor"
    checks.append(_floor_check(name, CE_FLOOR_TARGET, _find_ce(rows, two_ops)))
    if device_type == "cuda":
        for row in rows:
            if (row["section"], row["provider"]) == ("ce", ours) and row["classes"] >= GPU_CE_MIN_CLASSES:
                name = f"ce+sample+grad of '{ours}' at N={row['rows']}, C={row['classes']} {row['dtype']}, % of copy"
                detail = f"{row['gbps_eff']:.0f} GB/s, {row['median_ms']:.3f} ms"
                checks.append({"check": name, "measured": row["pct_copy"], "target": GPU_CE_COPY_TARGET,
                               "unit": "%", "detail": detail})
    return checks


def _site_checks(rows: list, ours: str) -> list:
    row = next((r for r in rows if (r["section"], r["provider"], r["mode"], r["dtype"], r.get("numel")) ==
                ("site", ours, "fwd+bwd", CHECK_DTYPE, SITE_CHECK_NUMEL)), None)
    name = f"site penalty fwd+bwd of '{ours}' at 2^22 {CHECK_DTYPE}, fraction of its floor"
    return [_floor_check(name, SITE_FLOOR_TARGET, row)]


def _train_checks(rows: list) -> list:
    checks = []
    for case, target in REG_SPEEDUP_TARGETS.items():
        plain, fused = _find_train(rows, case, REG_PLAIN), _find_train(rows, case, REG_FUSED)
        checks.append(_ratio_check(f"{case} regularized step speedup, fused vs plain", target, plain, fused))
    for case in REG_SPEEDUP_TARGETS:
        plain, fused = _find_train(rows, case, REG_PLAIN), _find_train(rows, case, REG_FUSED)
        checks.append(_memory_check(f"{case} regularized step peak memory saved, fused vs plain", 0.0, plain, fused))
    return checks


OVERHEAD_TARGETS = {  # torch's µs per call / ours
    "dropout fwd": 1.0, "dropout fwd+bwd": 1.0, "module fwd+bwd": 1.0, "cross-entropy fwd+bwd": 1.0,
    "site fwd+bwd": 1 / 1.5,
}


def _overhead_checks(rows: list) -> list:
    checks = []
    for case, target in OVERHEAD_TARGETS.items():
        row = next((r for r in rows if (r["section"], r.get("case")) == ("overhead", case)), None)
        name = f"host cost of {case}, torch / ours per call (16 elements, 1 thread)"
        if row is None:
            checks.append({"check": name, "measured": None, "target": target, "unit": "x", "detail": "not measured"})
            continue
        detail = (f"torch {row['torch_us']:.1f} us, ours {row['ours_us']:.1f} us; ops ours "
                  f"{row['ours_ops_fwd']}+{row['ours_ops_bwd']}, torch {row['torch_ops_fwd']}+{row['torch_ops_bwd']}")
        checks.append({"check": name, "measured": row["torch_us"] / row["ours_us"], "target": target, "unit": "x",
                       "detail": detail, "device_independent": True})
    return checks


def _judge(check: dict, informational: bool = False) -> dict:
    """Sets ``status``: MISSING without a figure, INFO where the target was not set for this device,
    else PASS or FAIL by the check's ``direction`` (``>=``, the default, or ``<=``)."""
    if check["measured"] is None:
        check["status"] = "MISSING"
    elif informational:
        check["status"] = "INFO"
    else:
        below = check.get("direction", ">=") == "<="
        met = check["measured"] <= check["target"] if below else check["measured"] >= check["target"]
        check["status"] = "PASS" if met else "FAIL"
    return check


def acceptance(rows: list, device_type: str) -> list:
    """The checks of the sections present in ``rows``, as dicts: check, measured, target, unit,
    status, detail."""
    ours = native_backend(device_type)
    sections = {r["section"] for r in rows}
    checks = []
    if "dropout" in sections:
        checks += _dropout_checks(rows, ours) + _floor_checks(rows, ours)
    if "kinds" in sections:
        checks += _kind_checks(rows)
    if "ce" in sections:
        checks += _ce_checks(rows, ours, device_type)
    if "site" in sections:
        checks += _site_checks(rows, ours)
    if "overhead" in sections:
        checks += _overhead_checks(rows)
    if "train" in sections:
        checks += _train_checks(rows)
    for check in checks:
        _judge(check, informational=device_type != "cpu" and not check.pop("device_independent", False))
    return checks


def _fmt(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.1f}%" if unit == "%" else f"{value:.2f}x"


def format_check(check: dict) -> str:
    """One line: status, what, measured value, target and the numbers behind it (with the source
    of those numbers first where the check names one)."""
    measured = "-" if check["measured"] is None else _fmt(check["measured"], check["unit"])
    target = _fmt(check["target"], check["unit"])
    source = f"{check['source']}: " if "source" in check else ""
    return (f"  {check['status']:<7} {check['check']}: {measured} (target {check.get('direction', '>=')} {target})"
            f"  [{source}{check['detail']}]")


# ---------------------------------------------------------------------------------------------
# The GPU verdict of one bench/gpu_check.sh run (issues 25 and 26)
# ---------------------------------------------------------------------------------------------

GPU_DTYPES = ("float32", "bfloat16")
# dropout fwd+bwd, eager's time / ours (Python calls), by size
GPU_DROPOUT_TARGETS = {2**16: 0.9, **{2**e: 1.0 for e in range(20, 27)}}
GPT2_REG_MAX_EAGER_STEPS, GPT2_REG_MIN_VS_PLAIN, GPT2_REG_PRECISION = 2.5, 1.2, "bfloat16 autocast"
LSTM_GRAPH_MIN_SPEEDUP = 2.0
# bench.gpu_kernels' grid (each op's device time from CUDA-graph replays), and issue 26's targets on it
KERNEL_DROPOUT_SIZES = (2**24, 2**26)
KERNEL_DROPOUT_MODES = ("fwd", "fwd+bwd")
KERNEL_CE_SHAPES = (("float32", 2048, 10_000), ("float32", 512, 50_257), ("bfloat16", 2048, 32_000))
KERNEL_SITE_SIZE = 2**24
KERNEL_DROPOUT_PCT, KERNEL_CE_PCT, KERNEL_SITE_PCT = 90.0, GPU_CE_COPY_TARGET, 80.0
TRITON_MAX_VS_CUDA = 1.2


def kernel_case(op: str, backend: str, dtype: str, size: str) -> str:
    """A case name of bench.gpu_kernels: ``"dropout fwd cuda float32 2^24"``, ``"ce backward triton
    bfloat16 2048x32000"`` (op, backend, dtype, size); ``"copy float32 2^24"`` for the copy (backend "")."""
    return " ".join(part for part in (op, backend, dtype, size) if part)


def kernel_cases(backends: tuple) -> list:
    """(op, backend, dtype, size label, numel or (N, C)) of every case of the grid for ``backends``,
    the copies and eager dropout included (backends "" and "eager")."""
    cases = []
    for dtype in GPU_DTYPES:
        for numel in KERNEL_DROPOUT_SIZES:
            cases.append(("copy", "", dtype, size_label(numel), numel))
            for backend in ("eager", *backends):
                cases += [(f"dropout {mode}", backend, dtype, size_label(numel), numel)
                          for mode in KERNEL_DROPOUT_MODES]
    for dtype, n, c in KERNEL_CE_SHAPES:
        for backend in backends:
            cases += [(f"ce {op}", backend, dtype, f"{n}x{c}", (n, c)) for op in ("sample+grad", "backward")]
    for dtype in GPU_DTYPES:
        for backend in backends:
            cases += [(f"site {mode}", backend, dtype, size_label(KERNEL_SITE_SIZE), KERNEL_SITE_SIZE)
                      for mode in ("fwd", "bwd")]
    return cases


def _kernel_check(name: str, target: float, row: Optional[dict]) -> dict:
    check = {"check": name, "measured": None, "target": target, "unit": "%", "source": "kernels"}
    if row is None or "pct_copy" not in row:
        return {**check, "detail": (row or {}).get("error", "not measured")}
    return {**check, "measured": row["pct_copy"],
            "detail": f"{row['case']} {row['us_per_call']:.1f} us, {row['gbps']:.0f} GB/s"}


def _triton_check(name: str, cuda: Optional[dict], triton: Optional[dict]) -> dict:
    check = {"check": name, "measured": None, "target": TRITON_MAX_VS_CUDA, "unit": "x", "direction": "<=",
             "source": "kernels"}
    if cuda is None or triton is None or "us_per_call" not in cuda or "us_per_call" not in triton:
        errors = [r["error"] for r in (cuda, triton) if r is not None and "error" in r]
        return {**check, "detail": "; ".join(errors) or "not measured"}
    return {**check, "measured": triton["us_per_call"] / cuda["us_per_call"],
            "detail": f"triton {triton['us_per_call']:.1f} us / cuda {cuda['us_per_call']:.1f} us"}


def _kernel_verdict(kernel_rows: list) -> list:
    """The cuda cases against the copy, then every Triton case against its cuda case."""
    by_case = {r["case"]: r for r in kernel_rows}
    of_copy, triton = [], []
    for op, backend, dtype, size, shape in kernel_cases(("cuda", "triton")):
        name = kernel_case(op, backend, dtype, size)
        if backend == "cuda" and op.startswith("dropout"):
            of_copy.append(_kernel_check(f"{name}, % of copy", KERNEL_DROPOUT_PCT, by_case.get(name)))
        elif backend == "cuda" and op == "ce sample+grad" and shape[1] >= GPU_CE_MIN_CLASSES:
            of_copy.append(_kernel_check(f"{name}, % of copy", KERNEL_CE_PCT, by_case.get(name)))
        elif backend == "cuda" and op.startswith("site"):
            of_copy.append(_kernel_check(f"{name}, % of copy", KERNEL_SITE_PCT, by_case.get(name)))
        elif backend == "triton":
            cuda = by_case.get(kernel_case(op, "cuda", dtype, size))
            triton.append(_triton_check(f"{name}, time / cuda's", cuda, by_case.get(name)))
    return of_copy + triton


def _train_missing(rows: list, case: str, variants: tuple) -> str:
    """Why a training figure is missing: the variants' ``train_error`` rows, or rows measured in
    another precision than the target's, else "not measured"."""
    why = [f"{r['provider']} failed: {r['error']}" for r in rows
           if r["section"] == "train_error" and r.get("case") == case and r.get("provider") in (*variants, WHOLE_CASE)]
    why += [f"{r['provider']} measured in {r.get('precision', r['dtype'])}" for r in rows
            if case == GPT2_REG_CASE and (r["section"], r.get("case")) == ("train", case) and r["provider"] in variants
            and _gpt2_row([r], r["provider"]) is None]
    return "; ".join(why) or "not measured"


def _gpt2_row(rows: list, variant: str) -> Optional[dict]:
    """The GPT-2 regularized case's row of ``variant`` if it was measured as the target says, under
    bfloat16 autocast."""
    row = _find_train(rows, GPT2_REG_CASE, variant)
    return row if row is not None and row.get("precision", "").startswith(GPT2_REG_PRECISION) else None


def _train_verdict(rows: list) -> list:
    eager, plain, fused = (_gpt2_row(rows, v) for v in (EAGER, REG_PLAIN, REG_FUSED))
    gpt2 = f"GPT-2 small regularized step ({GPT2_REG_CASE}, {GPT2_REG_PRECISION})"
    steps = {"check": f"{gpt2}, reg_fused in eager dropout steps", "measured": None,
             "target": GPT2_REG_MAX_EAGER_STEPS, "unit": "x", "direction": "<=", "source": "bench-train"}
    if eager is not None and fused is not None:
        steps.update(measured=fused["median_ms"] / eager["median_ms"],
                     detail=f"reg_fused {fused['median_ms']:.2f} ms / eager {eager['median_ms']:.2f} ms")
    vs_plain = _ratio_check(f"{gpt2}, reg_plain / reg_fused", GPT2_REG_MIN_VS_PLAIN, plain, fused)
    uncaptured, captured = _find_train(rows, LSTM_CASE, REG_FUSED), _find_train(rows, LSTM_CASE, REG_FUSED_GRAPH)
    graph = _ratio_check(f"{LSTM_CASE} regularized step, uncaptured / captured in a CUDA graph", LSTM_GRAPH_MIN_SPEEDUP,
                         uncaptured, captured)
    for check, case, variants in ((steps, GPT2_REG_CASE, (EAGER, REG_FUSED)),
                                  (vs_plain, GPT2_REG_CASE, (REG_PLAIN, REG_FUSED)),
                                  (graph, LSTM_CASE, (REG_FUSED, REG_FUSED_GRAPH))):
        if check["measured"] is None:
            check["detail"] = _train_missing(rows, case, variants)
    return [steps, {**vs_plain, "source": "bench-train"}, {**graph, "source": "bench-train"}]


def _dropout_verdict(rows: list) -> list:
    checks = []
    for dtype in GPU_DTYPES:
        for numel, target in GPU_DROPOUT_TARGETS.items():
            name = f"dropout fwd+bwd (Python calls) at {size_label(numel)} {dtype}, eager time / cuda time"
            check = {"check": name, "measured": None, "target": target, "unit": "x", "source": "bench-dropout",
                     "detail": "not measured"}
            eager, ours = _find(rows, "eager", "fwd+bwd", dtype, numel), _find(rows, "cuda", "fwd+bwd", dtype, numel)
            if eager is not None and ours is not None:
                check.update(measured=eager["median_ms"] / ours["median_ms"],
                             detail=f"eager {1e3 * eager['median_ms']:.1f} us / cuda {1e3 * ours['median_ms']:.1f} us")
            checks.append(check)
    return checks


def gpu_verdict(rows: list, kernel_rows: list) -> list:
    """The GPU targets (module docstring) over the rows of one bench/gpu_check.sh run (``rows``: its
    benchmark sections' rows; ``kernel_rows``: bench.gpu_kernels'), every target judged PASS, FAIL or
    MISSING (no figure: the section did not run, the case failed, or its row is absent), in a fixed
    order and number whatever ran."""
    overhead = [{**check, "source": "bench-overhead"} for check in _overhead_checks(rows)]
    for check in overhead:
        check.pop("device_independent", None)
    checks = _dropout_verdict(rows) + _train_verdict(rows) + _kernel_verdict(kernel_rows) + overhead
    return [_judge(check) for check in checks]
