"""dropout_indexed: dropout with the mask read at an affine logical index, on every backend against
the reference, and the property it exists for: the box of a tensor gets exactly the whole tensor's
mask (a shard of a DTensor reads the single-device mask)."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_BACKENDS, DTYPES, assert_bitwise_equal

import dropreg_ext as dr

R = dr.reference


def _strides(shape) -> list:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


# (global shape, box offsets, box shape): a last-dim shard (Colwise), a first-dim shard, a middle one,
# unaligned (offsets and rows not multiples of 8), a whole tensor, an empty box.
BOXES = [
    pytest.param((6, 40), (0, 20), (6, 20), id="last-dim-half"),
    pytest.param((6, 41), (0, 21), (6, 20), id="last-dim-uneven"),
    pytest.param((10, 7), (5, 0), (5, 7), id="first-dim"),
    pytest.param((3, 9, 5), (1, 2, 0), (2, 5, 5), id="middle-dims"),
    pytest.param((4, 3, 13), (0, 0, 3), (4, 3, 7), id="3d-unaligned"),
    pytest.param((2, 16), (0, 0), (2, 16), id="whole"),
    pytest.param((5, 8), (2, 0), (0, 8), id="empty"),
]


def _box(global_shape, offsets, shape):
    return tuple(slice(o, o + n) for o, n in zip(offsets, shape))


@pytest.mark.parametrize("global_shape,offsets,shape", BOXES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_box_gets_the_whole_tensors_mask(be, dtype, global_shape, offsets, shape):
    """The box of a tensor dropped by dropout_indexed == the whole tensor's dropout, boxed, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    whole = torch.randn(global_shape, generator=gen, dtype=torch.float64).to(dtype).to(be.device)
    rng = dr.ops.make_rng(be.device, 99)
    expected = R.dropout(whole, 0.4, rng)[_box(global_shape, offsets, shape)]
    box = whole[_box(global_shape, offsets, shape)].contiguous()
    strides = _strides(global_shape)
    base = sum(o * s for o, s in zip(offsets, strides))
    got = dr.ops.dropout_indexed(box, 0.4, rng, strides, base, backend=be.name)
    assert_bitwise_equal(got, expected, f"{be} box {offsets}+{shape} of {global_shape}")


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_row_major_index_is_plain_dropout(be):
    x = torch.randn(5, 33, device=be.device)
    rng = dr.ops.make_rng(be.device, 4)
    assert_bitwise_equal(dr.ops.dropout_indexed(x, 0.5, rng, [33, 1], 0, backend=be.name),
                         dr.ops.fused_dropout(x, 0.5, rng, backend=be.name), f"{be}")


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_noncontiguous_input_keeps_layout_and_mask(be):
    """A transposed input: position (i, j) still reads index base + i·s0 + j·s1, and the output keeps
    the input's layout (torch.empty_like)."""
    x = torch.randn(12, 7, device=be.device).t()  # (7, 12), strides (1, 7)
    rng = dr.ops.make_rng(be.device, 5)
    got = dr.ops.dropout_indexed(x, 0.3, rng, [100, 3], 17, backend=be.name)
    assert got.stride() == torch.empty_like(x).stride()
    assert_bitwise_equal(got, R.dropout_indexed(x.contiguous(), 0.3, rng, [100, 3], 17), f"{be}")


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_draw_form_matches_the_state_it_returns(be):
    x = torch.randn(3, 20, device=be.device)
    y, rng = dr.ops.BACKEND_OPS[be.name]["dropout_indexed_draw"](x, 0.5, [40, 1], 20, None)
    assert_bitwise_equal(y, R.dropout_indexed(x, 0.5, rng, [40, 1], 20), f"{be}")
    y7, rng7 = dr.ops.BACKEND_OPS[be.name]["dropout_indexed_draw"](x, 0.5, [40, 1], 20, 7)
    assert rng7.tolist() == [7, 0]
    assert_bitwise_equal(y7, R.dropout_indexed(x, 0.5, rng7, [40, 1], 20), f"{be} seed 7")


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_gradcheck(be):
    x = torch.randn(3, 6, dtype=torch.float64, device=be.device, requires_grad=True)
    rng = dr.ops.make_rng(be.device, 8)

    def f(x):
        return dr.ops.dropout_indexed(x, 0.4, rng, [12, 2], 5, backend=be.name)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("be", ALL_BACKENDS)
def test_opcheck(be):
    if be.name == "reference":
        pytest.skip("the reference's ops are checked with the others in test_dropout")
    x = torch.randn(4, 9, device=be.device)
    rng = dr.ops.make_rng(be.device, 1)
    op = dr.ops.BACKEND_OPS[be.name]["dropout_indexed"]
    torch.library.opcheck(op, (x, 0.3, rng, [18, 2], 3))


@pytest.mark.parametrize("be", ALL_BACKENDS)
@pytest.mark.parametrize(
    "strides,base,match",
    [
        ([1], 0, r"argument 'index_strides'"),
        ([5, -1], 0, r"argument 'index_strides'"),
        ([5, 1], -3, r"argument 'index_base'"),
        ([2**62, 2**62], 0, r"2\^63"),
    ],
    ids=["wrong-length", "negative-stride", "negative-base", "overflow"],
)
def test_bad_index_arguments_are_named(be, strides, base, match):
    x = torch.randn(3, 4, device=be.device)
    with pytest.raises((ValueError, RuntimeError), match=match):
        dr.ops.dropout_indexed(x, 0.3, dr.ops.make_rng(be.device, 1), strides, base, backend=be.name)
