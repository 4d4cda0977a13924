"""``python -m bench.sass [--so PATH] [--out FILE]``: SASS instructions per element of the GPU dropout
kernels for sm_90 (H100/H200), and the throughput ceiling they imply, without a GPU.

The CUDA kernels are read from the built extension (``cuobjdump --dump-sass``, the copy that Triton
ships), the Triton kernels are compiled ahead of time for sm_90 by Triton's own compiler. For each
kernel the grid-stride (CUDA) or per-program (Triton) work is one pass over a chunk of elements; the
count is the **hot path**: the shortest path of instructions from the loop head to the back branch
(CUDA) or from the entry to EXIT (Triton), which is the path of full, aligned chunks (the tail and
unaligned branches hold the scalar code).

Ceiling: an SM issues at most 4 warp instructions per cycle (one per scheduler), so at the H200's
1.98 GHz boost clock and 132 SMs the chip issues 132·4·32·1.98e9 = 3.35e13 thread-instructions/s;
``instr/elem`` of them per element caps the elements per second at 3.35e13 / (instr/elem). Memory
caps them at 4.8e12 B/s / (bytes/elem). The kernel is issue-bound where the first is the smaller;
"ceiling" is the smaller as a percentage of the memory rate (100% = the kernel can reach the HBM
rate; dual issue and latency are ignored, so this is an upper bound on the fraction).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import textwrap

ISSUE_RATE = 132 * 4 * 32 * 1.98e9  # thread-instructions per second, H200
HBM_BYTES = 4.8e12  # bytes per second, H200 datasheet
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse(text: str) -> list:
    """[(address, opcode, operands, predicated)] of one function's SASS."""
    return [(int(m.group(1), 16), m.group(3), m.group(4), m.group(2) is not None) for m in _INSTR.finditer(text)]


def _branch_target(operands: str):
    match = re.search(r"0x([0-9a-f]+)", operands)
    return int(match.group(1), 16) if match else None


def hot_path(instrs: list, start: int, stop: int) -> list:
    """The shortest instruction path from address ``start`` to ``stop`` (inclusive), following
    forward branches either way (a predicated branch may be taken or not, an unpredicated one must)."""
    index = {addr: k for k, (addr, *_rest) in enumerate(instrs)}
    best = {index[start]: (0, [])}
    order = sorted(k for k in index.values() if index[start] <= k <= index[stop])
    for k in order:
        if k not in best:
            continue
        cost, path = best[k]
        addr, op, operands, predicated = instrs[k]
        path = path + [instrs[k]]
        if k == index[stop]:
            return path
        nexts = []
        if op.startswith("BRA"):
            target = _branch_target(operands)
            if target is not None and target > addr and target in index:
                nexts.append(index[target])
            if predicated:
                nexts.append(k + 1)
        elif op != "EXIT" or predicated:
            nexts.append(k + 1)
        for n in nexts:
            if n <= index[stop] and (n not in best or best[n][0] > cost + 1):
                best[n] = (cost + 1, path)
    raise ValueError("no path from start to stop")


def loop_hot_path(instrs: list) -> list:
    """The hot path of the outermost loop: from the target of the last backward branch to it."""
    back = [(addr, _branch_target(ops)) for addr, op, ops, _p in instrs if op.startswith("BRA")]
    back = [(addr, target) for addr, target in back if target is not None and target < addr]
    addr, target = max(back, key=lambda b: b[0] - b[1])
    return hot_path(instrs, target, addr)


def entry_hot_path(instrs: list) -> list:
    """The hot path from the entry to the first unpredicated EXIT (a kernel without a loop)."""
    stop = next(addr for addr, op, _ops, predicated in instrs if op == "EXIT" and not predicated)
    return hot_path(instrs, instrs[0][0], stop)


def _triton_bin() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def cuda_functions(so: str) -> dict:
    """mangled name -> SASS text of every sm_90 function in the extension."""
    tool = os.path.join(_triton_bin(), "cuobjdump")
    out = subprocess.run([tool, "--dump-sass", "--gpu-architecture", "sm_90", so], capture_output=True, text=True,
                         check=True).stdout
    funcs = {}
    for part in out.split("Function : ")[1:]:
        name, _, body = part.partition("\n")
        funcs[name.strip()] = body
    return funcs


# The Triton kernels are compiled in a child process without TRITON_INTERPRET (an interpreted
# @triton.jit cannot be compiled); it prints the SASS of each case.
_TRITON_CHILD = textwrap.dedent(
    """
    import importlib, json, os, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    dropout = importlib.import_module("dropreg_ext.triton_kernels.dropout")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = {}
    for label, t, acc in json.loads(sys.stdin.read()):
        sig = {"x_ptr": "*" + t, "y_ptr": "*" + t, "rng_ptr": "*i64", "n": "i64", "threshold": "i32",
               "scale_bits": "i64" if acc == "fp64" else "i32", "BLOCK": "constexpr"}
        # As Triton specializes at run time for 16-byte aligned tensors and n divisible by 16.
        attrs = {(k,): [["tt.divisibility", 16]] for k in range(4)}
        src = ASTSource(fn=dropout._dropout_kernel, signature=sig, constexprs={"BLOCK": 1024}, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        out[label] = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
    print(json.dumps(out))
    """
)

# (label, dtype name, bytes per element read + written, elements per thread per pass)
CUDA_DROPOUT = [
    ("f64", "IddLb1E", 16, 8),
    ("f32", "IffLb1E", 8, 8),
    ("f16", "IN3c104HalfEfLb1E", 4, 8),
    ("bf16", "IN3c108BFloat16EfLb1E", 4, 8),
]
# Triton: BLOCK 1024 elements per program of 4 warps (128 threads): 8 elements a thread.
TRITON_DROPOUT = [("f64", "fp64", "fp64", 16), ("f32", "fp32", "fp32", 8), ("bf16", "bf16", "fp32", 4)]


def _row(kernel: str, dtype: str, path: list, elems: int, nbytes: int) -> list:
    per_elem = len(path) / elems
    philox = sum(1 for _a, op, _o, _p in path if op.startswith("IMAD.WIDE") or op.startswith("IMAD.HI"))
    issue = ISSUE_RATE / per_elem
    memory = HBM_BYTES / nbytes
    ceiling = min(1.0, issue / memory)
    return [kernel, dtype, str(len(path)), str(elems), f"{per_elem:.1f}", f"{philox / elems:.1f}",
            f"{issue / 1e12:.2f}", f"{memory / 1e12:.2f}", f"{100 * ceiling:.0f}%"]


def table(so: str) -> str:
    rows = []
    funcs = cuda_functions(so)
    for label, tag, nbytes, elems in CUDA_DROPOUT:
        name = next(n for n in funcs if "dropout_kernel" + tag in n)
        rows.append(_row("cuda dropout_kernel", label, loop_hot_path(parse(funcs[name])), elems, nbytes))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = [(label, t, acc) for label, t, acc, _b in TRITON_DROPOUT]
    import json

    child = subprocess.run([sys.executable, "-c", _TRITON_CHILD], input=json.dumps(cases), capture_output=True,
                           text=True, env=env, check=True)
    sass = json.loads(child.stdout.strip().splitlines()[-1])
    for label, _t, _acc, nbytes in TRITON_DROPOUT:
        rows.append(_row("triton _dropout_kernel", label, entry_hot_path(parse(sass[label])), 8, nbytes))
    headers = ["kernel", "dtype", "hot-path instr", "elements", "instr/elem", "Philox IMAD/elem",
               "issue-bound Telem/s", "HBM-bound Telem/s", "ceiling (of HBM)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", help="the built extension (default: dropreg_ext/_C*.so of this tree)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    so = args.so or next(iter(glob.glob(os.path.join(root, "dropreg_ext", "_C*.so"))), None)
    if so is None:
        print("python -m bench.sass: no built extension found (make build)", file=sys.stderr)
        return 2
    text = table(so)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
