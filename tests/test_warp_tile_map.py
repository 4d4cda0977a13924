"""The CUDA elementwise kernels' index maps, checked on the CPU: the warp-contiguous tiles of dropout and
the site penalty (csrc/include/warp_tile_map.h) give element i the Philox draw that reference.py's
counter layout gives it, and every grid takes each element exactly once.

tests/warp_tile_walk.cpp walks a whole grid with the header's functions, lane by lane (as
csrc/cuda/warp_tile.cuh hands the words to the lanes), and writes each element's count and draw. The
grids are small (1-5 warps, 1-3 slabs) so that the grid-stride loops and a warp's several runs are
taken; n covers a partial vector, a partial tile, a partial run and several runs. What this cannot
show is the kernels' execution on a GPU: it checks the maps the kernels call, not the device code.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise_equal

from dropreg_ext.reference import STREAM_DROPOUT_MASK, STREAM_SITE_NOISE, philox_bits, philox_uint16

ROOT = Path(__file__).resolve().parent.parent
SEED, OFFSET = 0x9E3779B97F4A7C15 % 2**63, 2**32 + 5  # both words of seed and offset non-zero
ELEMENT_BYTES = {"f64": 8, "f32": 4, "bf16": 2}
SIZES = [1, 5, 255, 513, 4097, 2048 * 3 + 77, 2048 * 9]
SLAB_WARPS = 8
RUN_ELEMS = 2048
MAX_SLABS = 8192


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path_factory.mktemp("walk") / "warp_tile_walk"
    subprocess.run([cxx, "-std=c++17", "-O2", "-w", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "warp_tile_walk.cpp"), "-o", str(exe)], check=True)

    def run(*args) -> tuple[torch.Tensor, torch.Tensor]:
        out = subprocess.run([str(exe), *map(str, (*args, SEED, OFFSET))], check=True, capture_output=True).stdout
        words = torch.frombuffer(bytearray(out), dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
        counts, draws = words.view(2, -1)
        return counts, draws

    run.exe = exe
    return run


def _rng() -> torch.Tensor:
    return torch.tensor([SEED, OFFSET], dtype=torch.int64)


def _check(counts: torch.Tensor, draws: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    taken = counts != 1
    assert not taken.any(), f"{what}: elements not taken exactly once: {taken.nonzero().flatten()[:8].tolist()}"
    assert_bitwise_equal(draws, expected, what)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("warps", [1, 3, 5])
@pytest.mark.parametrize("dtype", list(ELEMENT_BYTES))
@pytest.mark.parametrize("n", SIZES)
def test_dropout_tiles_draw_the_reference_u16(walk, n, dtype, warps, aligned):
    counts, draws = walk("dropout", ELEMENT_BYTES[dtype], n, int(aligned), warps)
    _check(counts, draws, philox_uint16(_rng(), STREAM_DROPOUT_MASK, n), f"dropout {dtype} n={n} warps={warps}")


@pytest.mark.parametrize("noise", ["rademacher", "dropout"])
@pytest.mark.parametrize("dtype", list(ELEMENT_BYTES))
@pytest.mark.parametrize("n", SIZES)
def test_site_runs_draw_the_reference_noise(walk, n, dtype, noise):
    """Forward with at most 1, 2 or 8192 slabs (several runs a warp), backward on 1, 3 or 5 warps."""
    rad = noise == "rademacher"
    expected = (philox_bits if rad else philox_uint16)(_rng(), STREAM_SITE_NOISE, n)
    for max_slabs in (1, 2, MAX_SLABS):
        counts, draws = walk("site_forward", ELEMENT_BYTES[dtype], n, int(rad), max_slabs)
        _check(counts, draws, expected, f"site forward {noise} {dtype} n={n} max_slabs={max_slabs}")
    for warps in (1, 3, 5):
        counts, draws = walk("site_backward", ELEMENT_BYTES[dtype], n, int(rad), warps)
        _check(counts, draws, expected, f"site backward {noise} {dtype} n={n} warps={warps}")


@pytest.mark.parametrize("n", [1, RUN_ELEMS * SLAB_WARPS, 2**24, 2**24 + 1, 2**27 + 3, 2**31, 3 * 2**33])
def test_slab_plan(walk, n):
    """At most kMaxSlabs slabs, none empty, covering n; a thread takes >= 8 chunks of 8 (one run)."""
    runs, slabs = map(int, subprocess.run([str(walk.exe), "plan", str(n)], check=True, capture_output=True,
                                          text=True).stdout.split())
    total_runs = -(-n // RUN_ELEMS)
    assert runs >= 1 and 1 <= slabs <= MAX_SLABS
    assert slabs * SLAB_WARPS * runs >= total_runs > (slabs - 1) * SLAB_WARPS * runs
    assert runs == -(-total_runs // (SLAB_WARPS * MAX_SLABS))  # the fewest runs a warp that fit
