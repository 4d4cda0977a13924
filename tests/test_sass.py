"""The GPU kernels' SASS for sm_90 (H100/H200), checked without a GPU wherever the extension was built
with CUDA: no local-memory instruction (LDL/STL: a register spill, or an array the compiler left
in local memory) in any CUDA kernel of the build but the known ones of KNOWN_SPILLS, none in any Triton
kernel as its launcher compiles it, and every CUDA row of ``python -m bench.sass`` at most its budget of
instructions per element (the issue-bound ceiling of bench/sass.py's docstring follows from it).

BUDGET holds each CUDA row's count as measured when it was last set, rounded up by about 2% (and to
a tenth): a change that makes a kernel's hot path longer fails here; one that makes it shorter lowers
the budget in the same commit. Rows: ``bench.sass`` ``Row.key`` (backend, op, dtype). Triton rows are
in the table but have no budget: their SASS depends on the Triton version (3.6 on the GPU image).
KNOWN_SPILLS: the LDL/STL count of each kernel that still spills (the cross-entropy sample in block
mode, issue 26); more fails, and so does fewer, so that the entry goes when the spills go.
"""

from __future__ import annotations

import importlib.util

import pytest

import dropreg_ext as dr

pytestmark = [
    pytest.mark.skipif(not dr._ext.HAS_CUDA, reason="extension built without CUDA kernels"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="cuobjdump ships with Triton"),
]

BUDGET = {
    # dropout (16 elements a thread a tile)
    "cuda dropout f64": 16.4,
    "cuda dropout f32": 13.1,
    "cuda dropout f16": 12.4,
    "cuda dropout bf16": 12.9,
    # cross-entropy (a chunk of 8; ce_grad_backward: a 16-byte vector)
    "cuda sample f32": 30.4,
    "cuda sample bf16": 32.4,
    "cuda sample+grad f32": 50.3,
    "cuda sample+grad bf16": 54.7,
    "cuda ce_grad f32": 17.5,
    "cuda ce_grad bf16": 19.6,
    "cuda ce_grad_backward f32": 40.6,
    "cuda ce_grad_backward bf16": 38.8,
    # site penalty, both terms (a step of 8, and a run of 64 for Rademacher noise)
    "cuda site_penalty rademacher f32": 17.4,
    "cuda site_penalty rademacher bf16": 20.3,
    "cuda site_penalty dropout f32": 25.8,
    "cuda site_penalty dropout bf16": 27.1,
    "cuda site_penalty_backward rademacher f32": 21.4,
    "cuda site_penalty_backward rademacher bf16": 26.3,
    "cuda site_penalty_backward dropout f32": 27.8,
    "cuda site_penalty_backward dropout bf16": 31.3,
}

_SAMPLE = "_ZN7dropreg2ce27cross_entropy_sample_kernel"
KNOWN_SPILLS = {
    _SAMPLE + "IffLb1EEEvNS0_10SampleArgsIT_T0_EE": 7,
    _SAMPLE + "IN3c104HalfEfLb1EEEvNS0_10SampleArgsIT_T0_EE": 7,
    _SAMPLE + "IN3c108BFloat16EfLb1EEEvNS0_10SampleArgsIT_T0_EE": 7,
}


@pytest.fixture(scope="module")
def sass():
    from bench import sass

    return sass


@pytest.fixture(scope="module")
def rows(sass):
    objects = [dr._ext.C.__file__]
    if not sass.cuda_functions(objects):
        pytest.skip("the extension holds no sm_90 code (TORCH_CUDA_ARCH_LIST without 9.0)")
    return {row.key: row for row in sass.dropout_rows(objects) + sass.regularizer_rows(objects)}


def test_no_cuda_kernel_uses_local_memory_but_the_known(sass, rows):
    spilling = sass.spilling_functions([dr._ext.C.__file__])
    assert spilling == KNOWN_SPILLS, "CUDA kernels with LDL/STL (sm_90), count and name:\n" + "\n".join(
        f"  {n:3d}  {name}" for name, n in sorted(spilling.items()))


def test_no_triton_kernel_uses_local_memory(rows):
    spilling = {key: row.spills for key, row in rows.items() if row.backend == "triton" and any(row.spills)}
    assert not spilling, f"Triton kernels with LDL/STL (sm_90), per kernel of the op: {spilling}"


def test_every_cuda_row_has_a_budget(rows):
    cuda = {key for key, row in rows.items() if row.backend == "cuda"}
    assert sorted(cuda) == sorted(BUDGET), (
        f"rows without a budget: {sorted(cuda - set(BUDGET))}; budgets without a row: {sorted(set(BUDGET) - cuda)}")


@pytest.mark.parametrize("key", sorted(BUDGET))
def test_instructions_per_element_within_budget(rows, key):
    row = rows[key]
    assert row.per_elem <= BUDGET[key], (
        f"{key}: {row.per_elem:.2f} SASS instructions per element on the hot path, budget {BUDGET[key]} "
        f"(paths of {row.detail}: {row.cells()[2]} instructions over {row.cells()[3]} elements)")
