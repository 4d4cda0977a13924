"""The issue's acceptance checks, computed from the rows of one run.

Stated for a 2-core CPU at n = 2^24 float32, "ours" being the C++ backend:

1. ours fwd+bwd is at least 3x faster than eager;
2. ours fwd is at least 2x faster than torch.compile's fwd;
3. the peak memory of ours fwd+bwd is at least n bytes (one bool mask) below eager's.

On other devices the same numbers are computed for the device's native backend and reported
as ``INFO``: the targets were set for the CPU.
"""

from __future__ import annotations

from typing import Optional

CHECK_NUMEL = 2**24
CHECK_DTYPE = "float32"


def native_backend(device_type: str) -> str:
    return "cuda" if device_type == "cuda" else "cpu"


def _find(rows: list, provider: str, mode: str) -> Optional[dict]:
    for row in rows:
        key = (row["section"], row["provider"], row["mode"], row["dtype"], row.get("numel"))
        if key == ("dropout", provider, mode, CHECK_DTYPE, CHECK_NUMEL):
            return row
    return None


def _ratio_check(name: str, target: float, base: Optional[dict], ours: Optional[dict]) -> dict:
    if base is None or ours is None:
        return {"check": name, "measured": None, "target": target, "unit": "x", "detail": "not measured"}
    ratio = base["median_ms"] / ours["median_ms"]
    detail = f"{base['provider']} {base['median_ms']:.2f} ms / {ours['provider']} {ours['median_ms']:.2f} ms"
    return {"check": name, "measured": ratio, "target": target, "unit": "x", "detail": detail}


def _memory_check(name: str, base: Optional[dict], ours: Optional[dict]) -> dict:
    target = float(CHECK_NUMEL)
    if base is None or ours is None or "peak_bytes" not in base or "peak_bytes" not in ours:
        return {"check": name, "measured": None, "target": target, "unit": "B", "detail": "not measured"}
    saved = base["peak_bytes"] - ours["peak_bytes"]
    detail = f"eager peak {base['peak_bytes'] / 2**20:.1f} MiB, ours {ours['peak_bytes'] / 2**20:.1f} MiB"
    return {"check": name, "measured": float(saved), "target": target, "unit": "B", "detail": detail}


def acceptance(rows: list, device_type: str) -> list:
    """The three checks as dicts: check, measured, target, unit, status, detail."""
    ours = native_backend(device_type)
    eager_fb, ours_fb = _find(rows, "eager", "fwd+bwd"), _find(rows, ours, "fwd+bwd")
    compile_f, ours_f = _find(rows, "compile", "fwd"), _find(rows, ours, "fwd")
    checks = [
        _ratio_check(f"fwd+bwd speedup of '{ours}' vs eager", 3.0, eager_fb, ours_fb),
        _ratio_check(f"fwd speedup of '{ours}' vs torch.compile", 2.0, compile_f, ours_f),
        _memory_check(f"fwd+bwd peak memory saved by '{ours}' vs eager", eager_fb, ours_fb),
    ]
    for check in checks:
        if check["measured"] is None:
            check["status"] = "MISSING"
        elif device_type != "cpu":
            check["status"] = "INFO"
        else:
            check["status"] = "PASS" if check["measured"] >= check["target"] else "FAIL"
    return checks


def _fmt(value: float, unit: str) -> str:
    return f"{value / 2**20:.1f} MiB" if unit == "B" else f"{value:.2f}x"


def format_check(check: dict) -> str:
    """One line: status, what, measured value, target and the numbers behind it."""
    measured = "-" if check["measured"] is None else _fmt(check["measured"], check["unit"])
    target = _fmt(check["target"], check["unit"])
    return f"  {check['status']:<7} {check['check']}: {measured} (target >= {target})  [{check['detail']}]"
