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
"""

from __future__ import annotations

from typing import Optional

CHECK_NUMEL = 2**24
CHECK_DTYPE = "float32"
CHECK_CE = (2048, 10_000)  # (N, C)
# bench.train's variant and case names, defined here, where no torch is imported.
EAGER, DROPREG, REG_PLAIN, REG_FUSED = "eager", "dropreg", "reg_plain", "reg_fused"
REG_FUSED_GENERIC, REG_FUSED_GRAPH = "reg_fused_generic", "reg_fused_graph"
LSTM_CASE, GPT2_REG_CASE = "lstm_lm", "gpt2_regularized"
REG_SPEEDUP_TARGETS = {LSTM_CASE: 2.0, "mlp": 1.0}
CE_FLOOR_CASES = (("float32", 2048, 10_000), ("bfloat16", 2048, 10_000), ("float32", 512, 50_257))
GPU_CE_COPY_TARGET, GPU_CE_MIN_CLASSES = 80.0, 32_000  # percent of the copy's GB/s, at C >= 32k


def size_label(numel: int) -> str:
    """``65536`` -> ``"2^16"`` (other numbers as they are)."""
    return f"2^{numel.bit_length() - 1}" if numel > 0 and numel & (numel - 1) == 0 else str(numel)


def size_text(row: dict) -> str:
    """``2^24`` for an elementwise case, ``2048x10000`` (N x C) for a cross-entropy case."""
    return f"{row['rows']}x{row['classes']}" if "classes" in row else size_label(row["numel"])


def native_backend(device_type: str) -> str:
    return "cuda" if device_type == "cuda" else "cpu"


def _find(rows: list, provider: str, mode: str, dtype: str = CHECK_DTYPE) -> Optional[dict]:
    for row in rows:
        key = (row["section"], row["provider"], row["mode"], row["dtype"], row.get("numel"))
        if key == ("dropout", provider, mode, dtype, CHECK_NUMEL):
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
    return next((r for r in rows if (r["section"], r["case"], r["provider"]) == ("train", case, variant)), None)


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
        row = next((r for r in rows if (r["section"], r["case"]) == ("overhead", case)), None)
        name = f"host cost of {case}, torch / ours per call (16 elements, 1 thread)"
        if row is None:
            checks.append({"check": name, "measured": None, "target": target, "unit": "x", "detail": "not measured"})
            continue
        detail = (f"torch {row['torch_us']:.1f} us, ours {row['ours_us']:.1f} us; ops ours "
                  f"{row['ours_ops_fwd']}+{row['ours_ops_bwd']}, torch {row['torch_ops_fwd']}+{row['torch_ops_bwd']}")
        checks.append({"check": name, "measured": row["torch_us"] / row["ours_us"], "target": target, "unit": "x",
                       "detail": detail, "device_independent": True})
    return checks


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
        if check["measured"] is None:
            check["status"] = "MISSING"
        elif device_type != "cpu" and not check.pop("device_independent", False):
            check["status"] = "INFO"
        else:
            check["status"] = "PASS" if check["measured"] >= check["target"] else "FAIL"
    return checks


def _fmt(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.1f}%" if unit == "%" else f"{value:.2f}x"


def format_check(check: dict) -> str:
    """One line: status, what, measured value, target and the numbers behind it."""
    measured = "-" if check["measured"] is None else _fmt(check["measured"], check["unit"])
    target = _fmt(check["target"], check["unit"])
    return f"  {check['status']:<7} {check['check']}: {measured} (target >= {target})  [{check['detail']}]"
