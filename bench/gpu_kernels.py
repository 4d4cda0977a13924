"""``python -m bench.gpu_kernels [--out DIR]``: each op's device time on CUDA, without host overhead.

``python -m bench`` times back-to-back calls from Python. On a GPU, a call whose kernels take tens of
microseconds is then bounded by the host (Python, dispatch, launches) rather than by its kernels:
the first H200 run measured our dropout forward at 46% of copy bandwidth at 2^24 float32 and 68% at
2^26, a fixed cost per call on top of a kernel near the copy rate. Here each case's calls are
captured in a CUDA graph and the graph is replayed: the time per call is the time its kernels keep
the GPU busy, against a device-to-device copy measured the same way; beside it, the same calls
back to back from Python (what ``python -m bench`` measures), whose excess is host cost. A case
whose capture fails is reported with its error, not dropped. Without CUDA it says so and exits 3.

Cases: dropout (ours on each backend, eager ``F.dropout``), the fused cross-entropy op
(``cross_entropy_sample_grad``) and its backward, the site penalty forward and backward. Bytes are
the least any implementation moves: dropout reads x and writes y; the cross-entropy op reads z and
writes G; its backward reads z and G's cotangent and writes z's gradient; the site penalty reads h,
g_e, g_i (forward) and also writes their gradients (backward). Writes ``DIR/kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import torch

from . import env

CALLS_PER_GRAPH = 10
REPLAYS = 10


def graph_time_s(fn: Callable[[], object], calls: int = CALLS_PER_GRAPH, replays: int = REPLAYS) -> float:
    """Seconds of device time per call of ``fn``: ``calls`` calls captured in one CUDA graph, the
    graph replayed ``replays`` times between two events (after one untimed replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture (lazy init, Triton compiles)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * calls)


def launch_time_s(fn: Callable[[], object], calls: int = CALLS_PER_GRAPH * REPLAYS) -> float:
    """Seconds per call of ``fn`` called back to back from Python, between two events: what
    ``python -m bench`` measures. Above graph_time_s by the host cost a call does not hide."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def cases(device: torch.device) -> list:
    """(name, bytes moved, function) per case."""
    import torch.nn.functional as F

    import dropreg_ext as dr

    ops = dr.ops.BACKEND_OPS
    backends = [b for b in ("cuda", "triton") if b in dr.ops.available_backends("cuda")]
    rng = dr.ops.make_rng(device, 0)
    out = []
    for dtype, n in ((torch.float32, 2**24), (torch.float32, 2**26), (torch.bfloat16, 2**26)):
        x = torch.randn(n, device=device, dtype=dtype)
        y = torch.empty_like(x)
        size, tag = 2 * x.numel() * x.element_size(), f"{str(dtype)[6:]} 2^{n.bit_length() - 1}"
        out.append((f"copy {tag}", size, lambda x=x, y=y: y.copy_(x)))
        out.append((f"dropout eager {tag}", size, lambda x=x: F.dropout(x, 0.5)))
        for b in backends:
            out.append((f"dropout {b} {tag}", size, lambda x=x, op=ops[b]["dropout"]: op(x, 0.5, rng)))
    for dtype, (rows, cols) in ((torch.float32, (2048, 10000)), (torch.float32, (512, 50257)),
                                (torch.bfloat16, (2048, 32000))):
        z = torch.randn(rows, cols, device=device, dtype=dtype)
        t = torch.randint(0, cols, (rows,), device=device)
        u = torch.randn_like(z)
        lse = torch.logsumexp(z.float(), -1)
        nbytes, tag = z.numel() * z.element_size(), f"{str(dtype)[6:]} {rows}x{cols}"
        for b in backends:
            fused, back = ops[b]["cross_entropy_sample_grad"], ops[b]["cross_entropy_sample_grad_backward"]
            out.append((f"ce sample+grad {b} {tag}", 2 * nbytes, lambda z=z, t=t, op=fused: op(z, t, rng, -100, None)))
            out.append((f"ce backward {b} {tag}", 3 * nbytes,
                        lambda z=z, t=t, u=u, lse=lse, op=back: op(None, u, None, z, lse, t, None, -100)))
    h = torch.randn(2**24, device=device)
    g_e, g_i = torch.randn_like(h), torch.randn_like(h)
    grad = torch.ones(2, device=device)
    for b in backends:
        fwd, bwd = ops[b]["site_penalty"], ops[b]["site_penalty_backward"]
        out.append((f"site fwd {b} float32 2^24", 3 * h.numel() * 4,
                    lambda op=fwd: op(h, g_e, g_i, 0.5, "rademacher", rng)))
        out.append((f"site bwd {b} float32 2^24", 6 * h.numel() * 4,
                    lambda op=bwd: op(grad, h, g_e, g_i, 0.5, "rademacher", rng)))
    return out


def run(device: torch.device) -> list:
    rows, copy_gbps = [], {}
    for name, nbytes, fn in cases(device):
        row = {"case": name, "bytes": nbytes}
        try:
            seconds = graph_time_s(fn)
        except Exception as exc:  # noqa: BLE001 - a case that cannot be captured is itself a finding
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch.cuda.synchronize(device)
        else:
            row.update(us_per_call=seconds * 1e6, gbps=nbytes / seconds / 1e9,
                       us_per_python_call=launch_time_s(fn) * 1e6)
            if name.startswith("copy "):
                copy_gbps[name.split(" ", 1)[1]] = row["gbps"]
        rows.append(row)
    best_copy = max(copy_gbps.values(), default=float("nan"))
    for row in rows:
        if "gbps" in row:
            row["pct_copy"] = 100 * row["gbps"] / best_copy
    return rows


def lines(rows: list) -> list:
    out = [f"{'case':<40} {'us/call':>9} {'GB/s':>8} {'of copy':>8} {'us/Python call':>15}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['case']:<40} {r['error']}")
        else:
            out.append(f"{r['case']:<40} {r['us_per_call']:9.1f} {r['gbps']:8.0f} {r['pct_copy']:7.0f}% "
                       f"{r['us_per_python_call']:15.1f}")
    return out


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for kernels.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_kernels: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3
    device = torch.device("cuda", torch.cuda.current_device())
    rows = run(device)
    print(f"device time per call (CUDA graph replay, {CALLS_PER_GRAPH} calls x {REPLAYS} replays) on "
          f"{torch.cuda.get_device_name(device)}; of copy: against the best device-to-device copy")
    print("\n".join(lines(rows)))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__, **env.git_state(),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
