"""Philox4x32-10 and the counter layout of the random-number contract (docs/design.md §3).

The reference is checked against the Random123 known-answer vectors, every backend against the
vectors and bit-for-bit against the reference, and the counter layout (key = seed, counter =
(element group, offset + stream)) against a hand computation with Python integers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bitwise_equal, sized_cases

import dropreg_ext as dr
from dropreg_ext import reference as R

MASK32 = 0xFFFFFFFF

# Random123 kat_vectors for philox4x32-10: (counter, key, expected output).
KNOWN_ANSWERS = [
    pytest.param((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), id="zeros"),
    pytest.param(
        (MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD), id="ones"
    ),
    pytest.param(
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        id="pi",
    ),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_reference_known_answers(counter, key, expected):
    words = R.philox4x32_10(counter, key)
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_backend_known_answers(backend, counter, key, expected):
    c = torch.tensor([counter], dtype=torch.int64, device=backend.device)
    k = torch.tensor([key], dtype=torch.int64, device=backend.device)
    out = dr.ops.philox(c, k, backend=backend.name)
    assert out.dtype == torch.int64 and out.shape == (1, 4)
    assert tuple(out[0].tolist()) == expected


def _random_words(n: int, width: int, generator: torch.Generator) -> torch.Tensor:
    words = torch.randint(0, 2**32, (n, width), dtype=torch.int64, generator=generator)
    words[:4] = torch.tensor([0, MASK32, 2**31 - 1, 2**31]).unsqueeze(1)  # extremes and sign boundary
    return words


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_backend_matches_reference_on_random_words(backend, n):
    gen = torch.Generator().manual_seed(1234 + n)
    counter, key = _random_words(max(n, 4), 4, gen)[:n], _random_words(max(n, 4), 2, gen)[:n]
    expected = R.philox(counter, key)
    out = dr.ops.philox(counter.to(backend.device), key.to(backend.device), backend=backend.name)
    assert_bitwise_equal(out.cpu(), expected, f"philox on {backend}")
    assert bool(((out >= 0) & (out <= MASK32)).all()), "outputs must be uint32 values"


@pytest.mark.parametrize("be, n", sized_cases("philox", {"cuda": [2**29 + 3], "triton-cuda": [2**29 + 3]}))
def test_raw_philox_past_2_29_rows(be, n):
    """Row r's words sit at 4·r + j: past 2^29 rows that index passes 2^31 (int32 indexing would
    wrap). The counters are the row numbers, so each row's expected output is computable alone;
    the first and last 4096 rows are checked. Needs ~45 GB of device memory (counter, key, out)."""
    if torch.cuda.mem_get_info()[0] < 48 * 2**30:
        pytest.skip("needs 48 GiB of free device memory")
    counter = torch.zeros((n, 4), dtype=torch.int64, device="cuda")
    counter[:, 0] = torch.arange(n, device="cuda")
    key = torch.full((n, 2), 7, dtype=torch.int64, device="cuda")
    out = dr.ops.philox(counter, key, backend=be.name)
    for rows in (slice(0, 4096), slice(n - 4096, n)):
        assert_bitwise_equal(out[rows].cpu(), R.philox(counter[rows].cpu(), key[rows].cpu()), f"{be} rows {rows}")
    del counter, key, out
    torch.cuda.empty_cache()


def test_philox_accepts_noncontiguous_rows(cpu_backend):
    gen = torch.Generator().manual_seed(5)
    counter = _random_words(16, 8, gen)[:, ::2]  # (16, 4) with row stride 8
    key = _random_words(16, 4, gen)[:, 1::2]
    out = dr.ops.philox(counter, key, backend=cpu_backend.name)
    assert_bitwise_equal(out, R.philox(counter.contiguous(), key.contiguous()))


# ------------------------------------------------------------------------------------------------
# Counter layout
# ------------------------------------------------------------------------------------------------


def hand_words(seed: int, offset: int, stream: int, g: int) -> list:
    """The four words of call g of the contract, with Python integers and the scalar reference Philox."""
    seed %= 2**64
    s = (offset + stream) % 2**64
    words = R.philox4x32_10((g & MASK32, g >> 32, s & MASK32, s >> 32), (seed & MASK32, seed >> 32))
    return [int(w) for w in words]


def hand_u32(seed: int, offset: int, stream: int, i: int) -> int:
    """u32(i): word i % 4 of call i // 4 (the Gumbel density)."""
    return hand_words(seed, offset, stream, i // 4)[i % 4]


def hand_u16(seed: int, offset: int, stream: int, i: int) -> int:
    """u16(i): 16-bit half i % 2 (low first) of word (i // 2) % 4 of call i // 8 (the mask density)."""
    return (hand_words(seed, offset, stream, i // 8)[(i // 2) % 4] >> (16 * (i % 2))) & 0xFFFF


def hand_bit(seed: int, offset: int, stream: int, i: int) -> int:
    """bit(i): bit i % 32 of word (i // 32) % 4 of call i // 128 (the Rademacher density)."""
    return (hand_words(seed, offset, stream, i // 128)[(i // 32) % 4] >> (i % 32)) & 1


def rng_tensor(seed: int, offset: int, device="cpu") -> torch.Tensor:
    """[seed, offset] as int64 bit patterns (values >= 2**63 wrap to negative int64)."""
    def as_int64(v: int) -> int:
        v %= 2**64
        return v - 2**64 if v >= 2**63 else v

    return torch.tensor([as_int64(seed), as_int64(offset)], dtype=torch.int64, device=device)


RNG_CASES = [
    pytest.param(0, 0, id="zero"),
    pytest.param(12345, 678, id="small"),
    pytest.param(0xDEADBEEF_CAFEF00D, 0x0123456789, id="seed-ge-2^63"),
    pytest.param(7, -1, id="offset-minus-1"),  # s = 2^64 - 1 for the mask, wraps to 0 for stream 1
    pytest.param(2**64 - 1, -(2**63), id="max-seed-min-offset"),
    pytest.param(2**32, 2**32 - 1, id="word-boundaries"),
]

LAYOUT_N = 37  # ten Philox groups, the last one partial


@pytest.mark.parametrize("seed, offset", RNG_CASES)
@pytest.mark.parametrize(
    "stream",
    [R.STREAM_DROPOUT_MASK, R.STREAM_SITE_NOISE, R.STREAM_GUMBEL, R.STREAM_GUMBEL_REFINE],
    ids=["mask", "site-noise", "gumbel", "gumbel-refine"],
)
def test_reference_counter_layout(seed, offset, stream):
    rng = rng_tensor(seed, offset)
    got = R.philox_uint32(rng, stream, LAYOUT_N)
    expected = torch.tensor([hand_u32(seed, offset, stream, i) for i in range(LAYOUT_N)], dtype=torch.int64)
    assert_bitwise_equal(got, expected, f"u32 of stream {stream}")


@pytest.mark.parametrize("seed, offset", RNG_CASES)
def test_reference_u16_and_bit_layouts(seed, offset):
    """The two denser readings of the same calls: 8 u16 halves and 128 bits per call."""
    rng = rng_tensor(seed, offset)
    n = 300  # 38 u16 calls (the last partial), 3 bit calls
    u16 = [hand_u16(seed, offset, R.STREAM_DROPOUT_MASK, i) for i in range(n)]
    bits = [hand_bit(seed, offset, R.STREAM_SITE_NOISE, i) for i in range(n)]
    assert R.philox_uint16(rng, R.STREAM_DROPOUT_MASK, n).tolist() == u16
    assert R.philox_bits(rng, R.STREAM_SITE_NOISE, n).tolist() == bits


@pytest.mark.parametrize("seed, offset", RNG_CASES)
@pytest.mark.parametrize("p", [0.3, 0.8], ids=["p0.3", "p0.8"])
def test_reference_keep_mask_layout(seed, offset, p):
    rng = rng_tensor(seed, offset)
    threshold = round(p * 2**16)
    expected = [hand_u16(seed, offset, R.STREAM_DROPOUT_MASK, i) >= threshold for i in range(LAYOUT_N)]
    keep = R.dropout_keep((LAYOUT_N,), p, rng)
    assert keep.tolist() == expected
    # multi-dim shapes use the row-major logical index
    assert_bitwise_equal(R.dropout_keep((1, LAYOUT_N), p, rng).flatten(), keep)


@pytest.mark.parametrize("seed, offset", RNG_CASES)
def test_backend_mask_follows_counter_layout(backend, seed, offset):
    """The kernels' masks follow the same hand-computed layout, wrap-around cases included."""
    p = 0.5
    rng = rng_tensor(seed, offset, backend.device)
    x = torch.ones(LAYOUT_N, dtype=torch.float32, device=backend.device)
    y = dr.ops.fused_dropout(x, p, rng, backend=backend.name)
    threshold = round(p * 2**16)
    expected = [hand_u16(seed, offset, R.STREAM_DROPOUT_MASK, i) >= threshold for i in range(LAYOUT_N)]
    assert (y != 0).tolist() == expected


def test_streams_do_not_share_counters():
    rng = rng_tensor(99, 1000)
    streams = (R.STREAM_DROPOUT_MASK, R.STREAM_SITE_NOISE, R.STREAM_GUMBEL, R.STREAM_GUMBEL_REFINE)
    assert sorted(streams) == list(range(4))  # a call reserves the offsets offset + 0..3
    words = [R.philox_uint32(rng, s, 4096) for s in streams]
    for a in range(len(streams)):
        for b in range(a + 1, len(streams)):
            assert not torch.equal(words[a], words[b])
            # not just shifted copies of one another within the call
            assert (words[a] == words[b]).float().mean() < 0.01


def test_threshold_and_scale_edges():
    """t = round(p·2^16), half to even; scale = 2^16/(2^16 - t), the quantized p's 1/(1-p')."""
    assert R.dropout_threshold(0.0) == 0
    assert R.dropout_threshold(1.0) == 2**16
    assert R.dropout_threshold(0.5) == 2**15
    assert R.dropout_threshold(1e-10) == 0  # below half a quantum: identity (scale 1 exactly)
    assert R.dropout_threshold(0.5 + 2**-17) == 2**15  # tie: half to even (as std::nearbyint)
    assert R.dropout_threshold(0.5 + 3 * 2**-17) == 2**15 + 2  # tie: half to even, upwards
    assert R.dropout_threshold(1 - 2**-30) == 2**16  # within half a quantum of 1: drops everything
    assert R.dropout_scale(1.0) == 0.0 and R.dropout_scale(1 - 2**-30) == 0.0
    assert R.dropout_scale(0.0) == 1.0 and R.dropout_scale(1e-10) == 1.0
    assert R.dropout_scale(0.75) == 4.0
    assert R.dropout_scale(0.3) == 2**16 / (2**16 - round(0.3 * 2**16))
    # the quantization bound: |p' - p| <= 2^-17
    for p in (0.1, 0.3, 1 / 3, 0.77, 0.999):
        assert abs(R.dropout_threshold(p) / 2**16 - p) <= 2**-17


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counter, key, match",
    [
        pytest.param(torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64),
                     "counter", id="counter-width-3"),
        pytest.param(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64),
                     "counter", id="counter-int32"),
        pytest.param(torch.zeros(12, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64),
                     "counter", id="counter-1d"),
        pytest.param(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, 4, dtype=torch.int64),
                     "key", id="key-width-4"),
        pytest.param([[0, 0, 0, 0]], torch.zeros(1, 2, dtype=torch.int64), "counter", id="counter-list"),
    ],
)
def test_philox_rejects_bad_shapes_and_dtypes(cpu_backend, counter, key, match):
    with pytest.raises(TypeError, match=f"argument '{match}'"):
        dr.ops.philox(counter, key, backend=cpu_backend.name)


def test_philox_rejects_row_count_mismatch(cpu_backend):
    """counter (3, 4) with key (1, 2): the C++ op refuses; reference and triton must too (the
    Triton kernel would read key rows past the end of the buffer)."""
    counter = torch.zeros(3, 4, dtype=torch.int64)
    key = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises((TypeError, ValueError, RuntimeError), match="'key'"):
        dr.ops.philox(counter, key, backend=cpu_backend.name)


def test_philox_out_of_range_words_are_rejected_or_agree():
    """Words outside [0, 2^32) are outside the contract: either every backend refuses them with an
    error naming the argument, or every backend returns the same bits."""
    counter = torch.tensor([[2**32 + 5, -1, 7, 2**40]], dtype=torch.int64)
    key = torch.tensor([[3, -2]], dtype=torch.int64)
    results, refused = {}, {}
    for name in dr.ops.available_backends("cpu"):
        try:
            results[name] = dr.ops.philox(counter, key, backend=name).tolist()
        except (TypeError, ValueError, RuntimeError) as exc:
            refused[name] = str(exc)
    for name, msg in refused.items():
        assert "counter" in msg or "key" in msg, f"{name}: error does not name the argument: {msg}"
    assert not (results and refused), f"some backends refuse ({sorted(refused)}), others return {results}"
    assert len({str(r) for r in results.values()}) <= 1, f"backends disagree: {results}"
