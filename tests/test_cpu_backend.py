"""The CPU backend's mechanisms, observed from a fresh process each (both are read once per process):

- which row of the dispatch tables (csrc/cpu/loops.h, exp_log.h) every CPU op runs, under
  ``DROPREG_CPU_CAPABILITY`` (``_C.cpu_entries_used()``);
- the fresh-output page mapping and its switch ``DROPREG_CPU_PREFAULT`` (``_C.cpu_prefaulted_bytes()``).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import textwrap

import pytest

import dropreg_ext as dr

pytestmark = pytest.mark.skipif(not dr._ext.HAS_CPU, reason="dropreg_ext._C not loaded")

ROWS = ["default", "avx2", "avx512"]  # narrowest first

# Every CPU op of the tables, each dtype class (float accumulation and f64), both dropout layouts,
# both site-noise kinds; then what the tables recorded and the row this process chose.
_CALL_EVERY_OP = textwrap.dedent(
    """
    import json
    import torch
    import dropreg_ext as dr

    C = dr._ext.C
    ops = torch.ops.dropreg
    rng = torch.tensor([12345, 678], dtype=torch.int64)
    C.reset_cpu_entries_used()
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(2, 8, 16, 24).to(dtype)
        ops.dropout(x, 0.3, rng)
        ops.dropout(x.to(memory_format=torch.channels_last), 0.3, rng)
        ops.dropout_(x.clone(), 1.0, rng)
        z = (3 * torch.randn(5, 300)).to(dtype)
        target = torch.tensor([0, 7, -100, 299, 42])
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale = torch.linspace(-1.0, 1.0, 5, dtype=acc)
        u = torch.randn(5, 300).to(dtype)
        ops.cross_entropy_sample(z, target, rng, -100)
        loss, lse, yhat, g, g_true = ops.cross_entropy_sample_grad(z, target, rng, -100, scale)
        ops.ce_grad(z, lse, target, scale, -100)
        ops.ce_grad_backward(u, z, lse, target, scale, -100)
        ops.cross_entropy_sample_grad_backward(loss, u, u, z, lse, target, scale, -100)
        h = torch.randn(5000).to(dtype)
        for noise in ("rademacher", "dropout"):
            ops.site_penalty(h, h, h, 0.3, noise, rng)
            ops.site_penalty_backward(torch.tensor([0.5, -2.0], dtype=acc), h, h, h, 0.3, noise, rng)
    print(json.dumps({"row": C.cpu_capability(), "used": C.cpu_entries_used()}))
    """
)


def _run(code: str, **env: str | None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in env}
    environ.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=600)


def _rows_used(capability: str | None) -> dict:
    result = _run(_CALL_EVERY_OP, DROPREG_CPU_CAPABILITY=capability)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def widest_row() -> str:
    """The row this CPU takes without a cap."""
    return _rows_used(None)["row"]


@pytest.mark.parametrize("capability", [None, "avx2", "default"], ids=["no-cap", "cap-avx2", "cap-default"])
def test_every_cpu_op_runs_the_row_the_cap_allows(capability, widest_row):
    """Each op and the float exp/log record the one row the capped choice allows: with
    DROPREG_CPU_CAPABILITY=default no AVX2 or AVX-512 loop runs (SLEEF's included: the portable
    row's exp/log is libm's), with =avx2 no AVX-512 one; without a cap, the CPU's widest."""
    expected = widest_row if capability is None else ROWS[min(ROWS.index(capability), ROWS.index(widest_row))]
    seen = _rows_used(capability)
    assert seen["row"] == expected
    assert seen["used"], "no op reported its row"
    for op, rows in seen["used"].items():
        assert rows == [expected], f"{op} ran the rows {rows}, expected only {expected!r}"


def test_reset_clears_the_rows_used():
    code = _CALL_EVERY_OP + "C.reset_cpu_entries_used(); print(json.dumps(C.cpu_entries_used()))\n"
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    after_reset = json.loads(result.stdout.strip().splitlines()[-1])
    assert after_reset and all(rows == [] for rows in after_reset.values())


# ------------------------------------------------------------------------------------------------
# The fresh-output page mapping
# ------------------------------------------------------------------------------------------------


def _kernel_populates() -> bool:
    """Whether this kernel has madvise(MADV_POPULATE_WRITE) (Linux >= 5.14)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    region = mmap.mmap(-1, 1 << 16)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(region))
        madv_populate_write = 23
        return libc.madvise(address, 1 << 16, madv_populate_write) == 0
    finally:
        region.close()


# A fresh 64 MiB output (above glibc's largest mmap threshold, so its pages are new) from two
# threads, and the same dropout in place (never mapped ahead) to compare its bits with.
_FRESH_DROPOUT = textwrap.dedent(
    """
    import json
    import torch
    import dropreg_ext as dr

    torch.set_num_threads(2)
    C = dr._ext.C
    x = torch.randn(1 << 24)
    rng = torch.tensor([3, 4], dtype=torch.int64)
    before = C.cpu_prefaulted_bytes()
    y = torch.ops.dropreg.dropout(x, 0.25, rng)
    mapped = C.cpu_prefaulted_bytes() - before
    in_place = x.clone()
    torch.ops.dropreg.dropout_(in_place, 0.25, rng)
    print(json.dumps({"on": C.cpu_prefault(), "mapped": mapped, "bytes": y.numel() * y.element_size(),
                      "same": bool(torch.equal(y, in_place))}))
    """
)


@pytest.mark.skipif(not _kernel_populates(), reason="the kernel has no MADV_POPULATE_WRITE")
@pytest.mark.parametrize("switch", [None, "1", "0"], ids=["default", "on", "off"])
def test_fresh_output_is_mapped_ahead_unless_switched_off(switch):
    result = _run(_FRESH_DROPOUT, DROPREG_CPU_PREFAULT=switch)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["same"], "the fresh output differs from the in-place dropout"
    if switch == "0":
        assert out["on"] is False and out["mapped"] == 0
    else:  # every whole page of the output but the edges
        assert out["on"] is True and 0.9 * out["bytes"] <= out["mapped"] <= out["bytes"]


def test_prefault_switch_rejects_other_values():
    result = _run(_FRESH_DROPOUT, DROPREG_CPU_PREFAULT="yes")
    assert result.returncode != 0
    assert "DROPREG_CPU_PREFAULT must be 0 or 1, got 'yes'" in result.stderr
