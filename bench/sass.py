"""``python -m bench.sass [--kernels dropout|regularizer] [--so PATH ...] [--out FILE]``: SASS
instructions per element of the GPU kernels for sm_90 (H100/H200), and the throughput ceiling they
imply, without a GPU. ``dropout`` (the default): the dropout kernels. ``regularizer``: the
cross-entropy (sample, fused sample + gradient, ce_grad, ce_grad_backward) and site-penalty
(forward, backward) kernels.

The CUDA kernels are read from the built extension or from the objects given with ``--so``
(``cuobjdump --dump-sass``, the copy that Triton ships; a ``.o`` compiled with nvcc works too), the
Triton kernels are compiled ahead of time for sm_90 by Triton's own compiler. For each kernel the
grid-stride (CUDA) or per-program (Triton) work is one pass over a chunk of elements; the count is
the **hot path**: the shortest path of instructions from the loop head to the back branch (CUDA) or
from the entry to EXIT (Triton), which is the path of full, aligned chunks (the tail and unaligned
branches hold the scalar code). The regularizer kernels' conventions are in REGULARIZER_NOTES.

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


def _successors(instr: tuple, k: int, index: dict) -> list:
    """Indices that instruction k can lead to: a forward branch's target (a predicated branch may
    also fall through, an unpredicated one must branch), else the next instruction (none after an
    unpredicated EXIT)."""
    addr, op, operands, predicated = instr
    if op.startswith("BRA"):
        target = _branch_target(operands)
        nexts = [index[target]] if target is not None and target > addr and target in index else []
        return nexts + ([k + 1] if predicated else [])
    return [k + 1] if op != "EXIT" or predicated else []


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
        path = path + [instrs[k]]
        if k == index[stop]:
            return path
        for n in _successors(instrs[k], k, index):
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


def cuda_functions(objects) -> dict:
    """mangled name -> SASS text of every sm_90 function in the extension or object file(s)."""
    tool = os.path.join(_triton_bin(), "cuobjdump")
    funcs = {}
    for path in [objects] if isinstance(objects, str) else objects:
        out = subprocess.run([tool, "--dump-sass", "--gpu-architecture", "sm_90", path], capture_output=True,
                             text=True, check=True).stdout
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


def table(objects) -> str:
    rows = []
    funcs = cuda_functions(objects)
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


# ---------------------------------------------------------------------------------------------
# Regularizer kernels: cross-entropy and site penalty
# ---------------------------------------------------------------------------------------------

REGULARIZER_NOTES = """\
Convention. The CUDA row kernels (the sample, ce_grad, ce_grad_backward) loop over a row in
chunks, one chunk per thread per pass: the count is the hot path of that loop body divided by the
elements of a chunk (8 for the sample and ce_grad, one 16-byte vector for ce_grad_backward, 8 for
the site penalty's grid-stride loops).
The hot path is the shortest path through the loop that a full chunk of a valid row takes with
its Philox calls drawn and no candidate (the exact Gumbel score: a few per row), no rescale of the
running sum (the row's max rises rarely) and no bound share (every second chunk): the path must
pass through the chunk's Philox multiplies, loads, exponentials and, for the fused kernels, its
shared-memory stores; "+" adds a second loop (the fused gradient's write pass, ce_grad_backward's
second pass from shared memory). Triton kernels: every loop of a pass over the elements (the
Triton sample's path must hold its Philox multiplies), per thread, divided by the elements a thread
takes per iteration (the largest tile of the element dtype that the kernel loads or stores, over
32·num_warps threads); kernels that combine per-program partial results (merge, partial sums) are
not counted. Shapes: cross-entropy (64, 50257) (GPT-2's vocabulary; the CUDA sample splits rows
longer than its on-chip limit, Triton by its own plan), site penalty 2^22 elements with both terms,
Rademacher noise. bytes/elem: the op's floor, every element tensor a kernel takes read or
written once (CUDA: the fused sample and ce_grad_backward keep the row on chip; Triton: the
tensors its kernels take, so a two-kernel op counts z twice).
"""

_PHILOX = re.compile(r"0x2daee0ad|0x326172a9|0xd2511f53|0xcd9e8d57")  # M0, M1 as signed or unsigned immediates


def philox_multiply(instr) -> bool:
    """Whether an instruction multiplies by a Philox-4x32 round constant."""
    return "IMAD" in instr[1] and bool(_PHILOX.search(instr[2]))


def _op_is(prefix: str):
    return lambda instr: instr[1].startswith(prefix)


def constrained_path(instrs: list, start: int, stop: int, needs: list) -> list:
    """The shortest instruction path from ``start`` to ``stop`` (forward branches only, as
    hot_path) that holds at least ``count`` instructions matching ``pred`` for every (pred, count)
    of ``needs``: the path of a chunk that takes the branches those instructions sit in."""
    index = {addr: k for k, (addr, *_rest) in enumerate(instrs)}
    first, last = index[start], index[stop]
    full = tuple(count for _pred, count in needs)
    states = {first: {tuple(0 for _ in needs): (0, [])}}
    for k in range(first, last + 1):
        instr = instrs[k]
        for counts, (cost, path) in states.pop(k, {}).items():
            counts = tuple(min(c + pred(instr), n) for c, (pred, n) in zip(counts, needs))
            path = path + [instr]
            if k == last:
                if counts == full:
                    return path
                continue
            for n in _successors(instr, k, index):
                if n <= last and (counts not in states.setdefault(n, {}) or states[n][counts][0] > cost + 1):
                    states[n][counts] = (cost + 1, path)
    raise ValueError("no path from start to stop with the required instructions")


def innermost_loop(instrs: list, pred) -> tuple:
    """(head, back branch) of the smallest loop whose body holds an instruction matching ``pred``."""
    loops = []
    for addr, op, operands, _p in instrs:
        target = _branch_target(operands) if op.startswith("BRA") else None
        if target is not None and target < addr:
            loops.append((target, addr))
    loops = [(t, a) for t, a in loops if any(pred(i) for i in instrs if t <= i[0] <= a)]
    return min(loops, key=lambda loop: loop[1] - loop[0])


def element_loops(instrs: list) -> list:
    """The innermost loops that load or store global memory: a kernel's passes over its elements."""
    loops = []
    for addr, op, operands, _p in instrs:
        target = _branch_target(operands) if op.startswith("BRA") else None
        if target is not None and target < addr:
            body = [i for i in instrs if target <= i[0] <= addr]
            if any(i[1].startswith(("LDG", "STG")) for i in body):
                loops.append((target, addr))
    return [(t, a) for t, a in loops if not any(t <= t2 and a2 <= a and (t2, a2) != (t, a) for t2, a2 in loops)]


# dtype -> (mangled template arguments, element size, elements of a 16-byte vector)
_CUDA_DTYPES = {"f32": ("IffL", 4, 4), "bf16": ("IN3c108BFloat16EfL", 2, 8)}


def _cuda_passes(op: str, size: int, vec: int) -> tuple:
    """(kernel, mode suffix, elements a chunk, bytes/elem, [(loop marker, needs)]) of a CUDA op."""
    ldg, stg = _op_is("LDG.E.128"), _op_is("STG.E.128")
    sts, lds, ex2, fmnmx = _op_is("STS.128"), _op_is("LDS.128"), _op_is("MUFU.EX2"), _op_is("FMNMX")
    sample_vecs = 8 // vec if vec < 8 else 1
    sample = [(philox_multiply, 36), (ex2, 9), (fmnmx, 9), (ldg, sample_vecs)]
    if op == "sample":
        return "cross_entropy_sample_kernel", "b1E", 8, size, [(ldg, sample)]
    if op == "sample+grad":
        return "cross_entropy_sample_kernel", "b1E", 8, 2 * size, [
            (ldg, sample + [(sts, sample_vecs)]), (lds, [(lds, sample_vecs), (ex2, 8), (stg, sample_vecs)])]
    if op == "ce_grad":
        return "ce_grad_kernel", "b1E", 8, 2 * size, [(ldg, [(ldg, sample_vecs), (ex2, 8), (stg, sample_vecs)])]
    if op == "ce_grad_backward":
        return "ce_grad_backward_kernel", "b1E", vec, 3 * size, [
            (sts, [(ldg, 2), (ex2, vec), (sts, 2)]), (lds, [(lds, 2), (ex2, vec), (stg, 1)])]
    site_vecs = 8 // vec
    if op == "site_penalty":
        return "site_penalty_partials_kernel", "b1ELb1E", 8, 3 * size, [
            (ldg, [(ldg, 3 * site_vecs), (philox_multiply, 18)])]
    return "site_penalty_backward_kernel", "b1ELb1E", 8, 6 * size, [
        (ldg, [(ldg, 3 * site_vecs), (stg, 3 * site_vecs), (philox_multiply, 18)])]


CUDA_REGULARIZER = ["sample", "sample+grad", "ce_grad", "ce_grad_backward", "site_penalty", "site_penalty_backward"]


def _regularizer_row(kernel: str, dtype: str, passes: list, nbytes: float) -> list:
    """A table row from the hot paths of an op's kernels: passes = [(paths, elements)], one per
    kernel, each kernel's paths covering `elements` elements of a thread."""
    per_elem = sum(sum(len(p) for p in paths) / elems for paths, elems in passes)
    philox = sum(sum(1 for p in paths for i in p if philox_multiply(i)) / elems for paths, elems in passes)
    issue = ISSUE_RATE / per_elem
    memory = HBM_BYTES / nbytes
    counts = " ; ".join(" + ".join(str(len(p)) for p in paths) for paths, _elems in passes)
    elements = " ; ".join(f"{elems:g}" for _paths, elems in passes)
    return [kernel, dtype, counts, elements, f"{per_elem:.1f}", f"{philox:.1f}", f"{nbytes:g}",
            f"{issue / 1e12:.2f}", f"{memory / 1e12:.2f}", f"{100 * min(1.0, issue / memory):.0f}%"]


def cuda_regularizer_rows(objects) -> list:
    funcs = cuda_functions(objects)
    rows = []
    for op in CUDA_REGULARIZER:
        for label, (tag, size, vec) in _CUDA_DTYPES.items():
            kernel, mode, elems, nbytes, passes = _cuda_passes(op, size, vec)
            name = next((n for n in funcs if kernel + tag + mode in n), None)
            if name is None:
                raise KeyError(f"no {kernel} for {label} in {objects}")
            instrs = parse(funcs[name])
            paths = [constrained_path(instrs, *innermost_loop(instrs, marker), needs) for marker, needs in passes]
            rows.append(_regularizer_row(f"cuda {op} ({kernel})", label, [(paths, elems)], nbytes))
    return rows


# The Triton regularizer kernels, compiled in a child process (as _TRITON_CHILD): each op's
# launcher runs on CPU tensors with every `kernel[grid](...)` recorded instead of launched, so the
# kernels, their arguments, constexprs and num_warps are whatever the launchers use today; each
# recorded launch is compiled for sm_90 with the specialization Triton would give those arguments.
_TRITON_REGULARIZER_CHILD = textwrap.dedent(
    """
    import json, os, subprocess, sys, tempfile
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    launch = __import__("dropreg_ext.triton_kernels._launch", fromlist=["_"])
    ce = __import__("dropreg_ext.triton_kernels.cross_entropy", fromlist=["_"])
    site = __import__("dropreg_ext.triton_kernels.site_penalty", fromlist=["_"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
    recorded = []
    JITFunction.__getitem__ = lambda self, grid: lambda *a, **k: recorded.append((self, grid, a, k))
    for mod in (launch, ce, site):
        if hasattr(mod, "kernel_launcher"):
            mod.kernel_launcher = lambda kernel: kernel

    def compile_launch(fn, args, kwargs):
        names = [p.name for p in fn.params]
        bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        no_spec = set(getattr(fn, "do_not_specialize", ()))
        sig, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = bound.get(p.name, p.default)
            if p.is_constexpr or v is None:
                sig[p.name], constexprs[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + TYPES[v.dtype]
                if v.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0 and p.name not in no_spec and i not in no_spec:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[p.name] = "fp32"
        options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        options.setdefault("num_warps", 4)
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        shown = {k: v for k, v in constexprs.items() if isinstance(v, (bool, int))}
        return {"kernel": fn.__name__, "sass": sass, "ttgir": kernel.asm["ttgir"],
                "num_warps": options["num_warps"], "constexprs": shown}

    out = []
    for op, dtype, shape in json.loads(sys.stdin.read()):
        dt = getattr(torch, dtype)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        rng = torch.zeros(2, dtype=torch.int64)
        if op.startswith("site"):
            h, n = torch.zeros(shape, dtype=dt), shape[0]
            grad = torch.zeros(2, dtype=acc)
            call = {"site_penalty": lambda: site.site_penalty(h, h, h, 0.3, "rademacher", rng),
                    "site_penalty_backward": lambda: site.site_penalty_backward(grad, h, h, h, 0.3, "rademacher", rng)}
        else:
            z, n = torch.zeros(shape, dtype=dt), shape[0] * shape[1]
            t, lse = torch.zeros(shape[0], dtype=torch.int64), torch.zeros(shape[0], dtype=acc)
            call = {"cross_entropy_sample": lambda: ce.cross_entropy_sample(z, t, rng, -100),
                    "cross_entropy_sample_grad": lambda: ce.cross_entropy_sample_grad(z, t, rng, -100),
                    "ce_grad": lambda: ce.ce_grad(z, lse, t, lse, -100),
                    "ce_grad_backward": lambda: ce.ce_grad_backward(z, z, lse, t, lse, -100)}
        recorded.clear()
        call[op]()
        for fn, grid, args, kwargs in recorded:
            tensors = sum(isinstance(a, torch.Tensor) and a.numel() == n for a in list(args) + list(kwargs.values()))
            if tensors:
                out.append(dict(compile_launch(fn, args, kwargs), op=op, dtype=dtype, tensors=tensors))
    print(json.dumps(out))
    """
)

TRITON_REGULARIZER = [
    (op, dtype, shape)
    for op, shape in [("cross_entropy_sample", [64, 50257]), ("cross_entropy_sample_grad", [64, 50257]),
                      ("ce_grad", [64, 50257]), ("ce_grad_backward", [64, 50257]),
                      ("site_penalty", [2**22]), ("site_penalty_backward", [2**22])]
    for dtype in ("float32", "bfloat16")
]
_BOOKKEEPING = re.compile(r"merge|partial|finish")  # kernels over per-program results, not elements
_TILE = re.compile(r"tensor<((?:\d+x)+)(?:!tt\.ptr<)?(f32|bf16|f16|f64)\b")
_TT_TYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def _element_tile(ttgir: str, dtype: str) -> int:
    """Elements of the largest tile of ``dtype`` that the kernel loads or stores."""
    tiles = [1]
    for line in ttgir.splitlines():
        if "tt.load" in line or "tt.store" in line:
            for dims, ty in _TILE.findall(line):
                if ty == _TT_TYPE[dtype]:
                    size = 1
                    for d in dims.rstrip("x").split("x"):
                        size *= int(d)
                    tiles.append(size)
    return max(tiles)


def triton_regularizer_rows() -> list:
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", _TRITON_REGULARIZER_CHILD], input=json.dumps(TRITON_REGULARIZER),
                           capture_output=True, text=True, env=env, check=True)
    ops = {}  # (op, dtype) -> [(kernel description, paths, elements, element tensors)]
    for launch in json.loads(child.stdout.strip().splitlines()[-1]):
        if _BOOKKEEPING.search(launch["kernel"]):
            continue
        instrs = parse(launch["sass"])
        per_thread = _element_tile(launch["ttgir"], launch["dtype"]) / (32 * launch["num_warps"])
        needs = [(philox_multiply, 18 * max(1, int(per_thread) // 4))] if "sample" in launch["kernel"] else []
        loops = element_loops(instrs)
        if loops:
            paths = [constrained_path(instrs, head, back,
                                      needs if any(philox_multiply(i) for i in instrs if head <= i[0] <= back) else [])
                     for head, back in loops]
        else:
            paths = [entry_hot_path(instrs)]
        shown = " ".join(f"{k}={v}" for k, v in launch["constexprs"].items())
        ops.setdefault((launch["op"], launch["dtype"]), []).append(
            (f"{launch['kernel']} {shown} num_warps={launch['num_warps']}", paths, per_thread, launch["tensors"]))
    rows = []
    for (op, dtype), kernels in ops.items():
        size = 4 if dtype == "float32" else 2
        label = {"float32": "f32", "bfloat16": "bf16"}[dtype]
        rows.append(_regularizer_row(f"triton {op} ({'; '.join(k[0] for k in kernels)})", label,
                                     [(paths, elems) for _k, paths, elems, _t in kernels],
                                     size * sum(k[3] for k in kernels)))
    return rows


def regularizer_table(objects) -> str:
    rows = cuda_regularizer_rows(objects) + triton_regularizer_rows()
    headers = ["kernel", "dtype", "hot-path instr", "elements", "instr/elem", "Philox IMAD/elem", "bytes/elem",
               "issue-bound Telem/s", "HBM-bound Telem/s", "ceiling (of HBM)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return REGULARIZER_NOTES + "\n" + "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", choices=["dropout", "regularizer"], default="dropout")
    parser.add_argument("--so", nargs="+", help="the built extension or object files (default: dropreg_ext/_C*.so "
                                                "of this tree)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    objects = args.so or glob.glob(os.path.join(root, "dropreg_ext", "_C*.so"))[:1]
    if not objects:
        print("python -m bench.sass: no built extension found (make build)", file=sys.stderr)
        return 2
    text = table(objects) if args.kernels == "dropout" else regularizer_table(objects)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
