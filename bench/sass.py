"""``python -m bench.sass [--kernels dropout|regularizer|all] [--so PATH ...] [--out-dir DIR]``: SASS
instructions per element of every GPU kernel for sm_90 (H100/H200), their registers and local-memory
spills, and the throughput ceiling the count implies, without a GPU. ``dropout``: the dropout
kernels; ``regularizer``: the cross-entropy (sample, fused sample + gradient, ce_grad,
ce_grad_backward) and site-penalty (forward, backward, both noise kinds) kernels; ``all`` (the
default) both tables. ``--out-dir`` writes them as ``dropout_sm90.md`` and ``regularizer_sm90.md``.

The CUDA kernels are read from the built extension or from the objects given with ``--so``
(``cuobjdump --dump-sass`` and ``--dump-resource-usage``, the copies that Triton ships; a ``.o`` or
``.cubin`` compiled with nvcc works too); the Triton kernels are compiled ahead of time for sm_90 by
Triton's own compiler, with the launch parameters their launchers use. For each kernel the count is
the **hot path**: the shortest path of instructions through the loop that takes the kernel's full,
aligned tiles (CUDA) or from the entry to EXIT (a Triton program without a loop), divided by the
elements a thread takes in one pass of it. The conventions of each kernel are in NOTES.

Ceiling: an SM issues at most 4 warp instructions per cycle (one per scheduler), so at the H200's
1.98 GHz boost clock and 132 SMs the chip issues 132·4·32·1.98e9 = 3.35e13 thread-instructions/s;
``instr/elem`` of them per element caps the elements per second at 3.35e13 / (instr/elem). Memory
caps them at 4.8e12 B/s / (bytes/elem). "ceiling" is the first as a percentage of the second: at or
above 100% the kernel can reach the HBM rate at perfect issue (dual issue and latency are ignored,
so this is an upper bound), below it the kernel is issue-bound at that fraction.

``tests/test_sass.py`` checks the same rows in CI against a budget per row, and every CUDA kernel of
the build for local-memory instructions (LDL/STL).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import textwrap

ISSUE_RATE = 132 * 4 * 32 * 1.98e9  # thread-instructions per second, H200
HBM_BYTES = 4.8e12  # bytes per second, H200 datasheet
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")

NOTES = """\
Conventions. A CUDA row's count is the hot path of its kernel's loop over full, aligned tiles or
chunks, divided by the elements a thread takes in one pass: dropout 16 (a warp tile of 512: two
Philox calls a lane, warp-contiguous 16-byte vectors), the site penalty 8 a step (one call a lane)
plus, for Rademacher noise, the run's share (its 16 calls and table, 8 steps: 64 elements), the
sample and ce_grad 8 (a chunk), ce_grad_backward one 16-byte vector. The path must hold the
instructions a pass of that kind executes: the chunk's Philox multiplies (the sample: the call of
its Gumbel filter bits, though a chunk skips it when no element can win; a candidate's refinement
draw and exact score, a few per row, are left out, as are the rescale of the running sum and the
bound shared every second chunk), its loads and exponentials and, for the fused kernels, its
shared-memory stash; "+" adds a second loop (the fused gradient's pass, ce_grad_backward's pass from
shared memory). Triton rows: every loop of a pass over the elements (the sample's path must hold its
Philox multiplies), per thread, divided by the elements a thread takes per iteration (the largest
tile of the element dtype that the kernel loads or stores, over 32·num_warps threads); kernels that
combine per-program partial results (merge, partial sums) are not counted; ";" separates an op's
kernels. Shapes: dropout 2^24, cross-entropy (64, 50257) (GPT-2's vocabulary; the CUDA sample splits
rows longer than its on-chip limit, Triton by its own plan), site penalty 2^22 with both terms.
bytes/elem: the op's floor, every element tensor a kernel takes read or written once (CUDA: the
fused sample and ce_grad_backward keep the row on chip; Triton: the tensors its kernels take, so a
two-kernel op counts z twice). regs and LDL/STL: the row's kernel (";" per kernel); the CI test asks
for none in any kernel but the known ones (tests/test_sass.py, KNOWN_SPILLS).
"""


# ---------------------------------------------------------------------------------------------
# SASS control flow: hot paths through loops
# ---------------------------------------------------------------------------------------------


def parse(text: str) -> list:
    """[(address, opcode, operands, predicated)] of one function's SASS."""
    return [(int(m.group(1), 16), m.group(3), m.group(4), m.group(2) is not None) for m in _INSTR.finditer(text)]


def _branch_target(operands: str):
    match = re.search(r"0x([0-9a-f]+)", operands)
    return int(match.group(1), 16) if match else None


def _successors(instr: tuple, k: int, index: dict) -> list:
    """Indices that instruction k can lead to: a forward branch's target (a predicated branch, and
    BRA.DIV, taken only by a diverged warp, may also fall through; an unpredicated one must branch),
    else the next instruction (none after an unpredicated EXIT)."""
    addr, op, operands, predicated = instr
    if op.startswith("BRA"):
        target = _branch_target(operands)
        nexts = [index[target]] if target is not None and target > addr and target in index else []
        return nexts + ([k + 1] if predicated or op == "BRA.DIV" else [])
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


def loops(instrs: list) -> list:
    """(head, back branch) of every loop: the backward branches, except those that return from the
    code a diverged warp takes (BRA.DIV targets, placed after the kernel's body) into the body."""
    handlers = [_branch_target(ops) for _a, op, ops, _p in instrs if op == "BRA.DIV"]
    body_end = min((t for t in handlers if t is not None), default=None)
    out = []
    for addr, op, operands, _p in instrs:
        target = _branch_target(operands) if op.startswith("BRA") else None
        if target is not None and target < addr and (body_end is None or addr < body_end):
            out.append((target, addr))
    return out


def loop_hot_path(instrs: list) -> list:
    """The hot path of the outermost loop: from the head of the longest loop to its back branch."""
    head, back = max(loops(instrs), key=lambda loop: loop[1] - loop[0])
    return hot_path(instrs, head, back)


def entry_hot_path(instrs: list) -> list:
    """The hot path from the entry to the first unpredicated EXIT (a kernel without a loop)."""
    stop = next(addr for addr, op, _ops, predicated in instrs if op == "EXIT" and not predicated)
    return hot_path(instrs, instrs[0][0], stop)


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
    found = [(t, a) for t, a in loops(instrs) if any(pred(i) for i in instrs if t <= i[0] <= a)]
    return min(found, key=lambda loop: loop[1] - loop[0])


def element_loops(instrs: list) -> list:
    """The innermost loops that load or store global memory: a kernel's passes over its elements."""
    found = [(t, a) for t, a in loops(instrs)
             if any(i[1].startswith(("LDG", "STG")) for i in instrs if t <= i[0] <= a)]
    return [(t, a) for t, a in found if not any(t <= t2 and a2 <= a and (t2, a2) != (t, a) for t2, a2 in found)]


# ---------------------------------------------------------------------------------------------
# Reading compiled code: SASS and resource usage (cuobjdump from Triton's bundle)
# ---------------------------------------------------------------------------------------------


def _triton_bin() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _cuobjdump(flag: str, path: str) -> str:
    args = [os.path.join(_triton_bin(), "cuobjdump"), flag]
    if not path.endswith(".cubin"):
        args += ["--gpu-architecture", "sm_90"]
    return subprocess.run(args + [path], capture_output=True, text=True, check=True).stdout


def _paths(objects) -> list:
    return [objects] if isinstance(objects, str) else list(objects)


def cuda_functions(objects) -> dict:
    """mangled name -> SASS text of every sm_90 function in the extension or object file(s)."""
    funcs = {}
    for path in _paths(objects):
        for part in _cuobjdump("--dump-sass", path).split("Function : ")[1:]:
            name, _, body = part.partition("\n")
            funcs[name.strip()] = body
    return funcs


_RESOURCES = re.compile(r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+)")


def registers(objects) -> dict:
    """mangled name -> registers per thread of every sm_90 function in the file(s)."""
    out = {}
    for path in _paths(objects):
        usage = _cuobjdump("--dump-resource-usage", path)
        out.update({m.group(1): int(m.group(2)) for m in _RESOURCES.finditer(usage)})
    return out


def local_memory_ops(sass: str) -> int:
    """LDL/STL instructions of one function: register spills, or arrays that live in local memory."""
    return sum(1 for _a, op, _o, _p in parse(sass) if op.startswith(("LDL", "STL")))


def spilling_functions(objects) -> dict:
    """mangled name -> LDL/STL count of every function in the file(s) that has any."""
    counts = {name: local_memory_ops(body) for name, body in cuda_functions(objects).items()}
    return {name: n for name, n in counts.items() if n}


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One op's kernels in one dtype: kernels = per kernel, its loops' [(hot path, elements a thread
    takes in one pass of that loop)]; regs and spills per kernel."""

    backend: str
    op: str
    dtype: str
    detail: str
    kernels: list
    nbytes: float
    regs: list
    spills: list

    @property
    def key(self) -> str:
        """How tests/test_sass.py's budget table names the row."""
        return f"{self.backend} {self.op} {self.dtype}"

    def _sum(self, count) -> float:
        return sum(count(path) / elems for loops_ in self.kernels for path, elems in loops_)

    @property
    def per_elem(self) -> float:
        return self._sum(len)

    @property
    def philox_per_elem(self) -> float:
        return self._sum(lambda path: sum(1 for i in path if philox_multiply(i)))

    @property
    def ceiling(self) -> float:
        """Issue-bound over HBM-bound elements per second (1.0: the HBM rate at perfect issue)."""
        return (ISSUE_RATE / self.per_elem) / (HBM_BYTES / self.nbytes)

    def cells(self) -> list:
        counts = " ; ".join(" + ".join(str(len(p)) for p, _e in loops_) for loops_ in self.kernels)
        elems = " ; ".join(" + ".join(f"{e:g}" for _p, e in loops_) for loops_ in self.kernels)
        return [f"{self.backend} {self.op} ({self.detail})", self.dtype, counts, elems, f"{self.per_elem:.1f}",
                f"{self.philox_per_elem:.1f}", f"{self.nbytes:g}", " ; ".join(map(str, self.regs)),
                " ; ".join(map(str, self.spills)), f"{ISSUE_RATE / self.per_elem / 1e12:.2f}",
                f"{HBM_BYTES / self.nbytes / 1e12:.2f}", f"{100 * self.ceiling:.0f}%"]


HEADERS = ["kernel", "dtype", "hot-path instr", "elements", "instr/elem", "Philox IMAD/elem", "bytes/elem", "regs",
           "LDL/STL", "issue-bound Telem/s", "HBM-bound Telem/s", "ceiling (of HBM)"]


def render(rows: list) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r.cells()) + " |" for r in rows])


def outer_overhead(instrs: list, inner: tuple, needs: list) -> list:
    """The instructions of the hot path of the loop around ``inner`` (holding ``needs``, as
    constrained_path) that lie outside ``inner``: the per-pass work of the outer loop."""
    head, back = inner
    outer = min(((t, a) for t, a in loops(instrs) if t <= head and back <= a and (t, a) != inner),
                key=lambda loop: loop[1] - loop[0])
    return [i for i in constrained_path(instrs, *outer, needs) if not head <= i[0] <= back]


# CUDA dtypes: (mangled template arguments, element size, elements of a 16-byte vector)
_CUDA_DTYPES = {"f64": ("IddL", 8, 2), "f32": ("IffL", 4, 4), "f16": ("IN3c104HalfEfL", 2, 8),
                "bf16": ("IN3c108BFloat16EfL", 2, 8)}
DROPOUT_DTYPES = ["f64", "f32", "f16", "bf16"]
REGULARIZER_DTYPES = ["f32", "bf16"]
# CUDA ops: the regularizer rows, in table order (dropout is its own table).
CUDA_REGULARIZER = ["sample", "sample+grad", "ce_grad", "ce_grad_backward", "site_penalty rademacher",
                    "site_penalty dropout", "site_penalty_backward rademacher", "site_penalty_backward dropout"]
_SITE_RUN_ELEMS = 64  # a site run: 8 steps of 8 elements a thread


def _cuda_spec(op: str, size: int, vec: int) -> tuple:
    """(kernel, template suffix, bytes/elem, [(loop marker, needs, elements, outer needs or None)]) of
    a CUDA op: each pass is the innermost loop holding its marker, its path holding `needs`; with
    outer needs, the loop around it adds its own work per `outer elements` (the site run)."""
    ldg, stg = _op_is("LDG.E.128"), _op_is("STG.E.128")
    sts, lds, ex2, fmnmx = _op_is("STS.128"), _op_is("LDS.128"), _op_is("MUFU.EX2"), _op_is("FMNMX")
    if op == "dropout":
        return "dropout_kernel", "b1E", 2 * size, [(ldg, [(ldg, 16 // vec), (philox_multiply, 36)], 16, None)]
    sample_vecs = 8 // vec if vec < 8 else 1
    sample = [(philox_multiply, 18), (ex2, 9), (fmnmx, 9), (ldg, sample_vecs)]
    if op == "sample":
        return "cross_entropy_sample_kernel", "b1E", size, [(ldg, sample, 8, None)]
    if op == "sample+grad":
        return "cross_entropy_sample_kernel", "b1E", 2 * size, [
            (ldg, sample + [(sts, sample_vecs)], 8, None),
            (lds, [(lds, sample_vecs), (ex2, 8), (stg, sample_vecs)], 8, None)]
    if op == "ce_grad":
        return "ce_grad_kernel", "b1E", 2 * size, [(ldg, [(ldg, sample_vecs), (ex2, 8), (stg, sample_vecs)], 8, None)]
    if op == "ce_grad_backward":
        return "ce_grad_backward_kernel", "b1E", 3 * size, [
            (sts, [(ldg, 2), (ex2, vec), (sts, 2)], vec, None), (lds, [(lds, 2), (ex2, vec), (stg, 1)], vec, None)]
    kind = op.split()[1]
    noise = "1E" if kind == "rademacher" else "0E"
    site_vecs = 8 // vec
    backward = op.startswith("site_penalty_backward")
    loads = [(ldg, 3 * site_vecs)] + ([(stg, 3 * site_vecs)] if backward else [])
    if kind == "rademacher":  # the step reads its bits from the table; the run computes the calls
        step = (ldg, loads + [(_op_is("LDS"), site_vecs)], 8, loads + [(philox_multiply, 18)])
    else:
        step = (ldg, loads + [(philox_multiply, 18)], 8, None)
    kernel = "site_penalty_backward_kernel" if backward else "site_penalty_partials_kernel"
    return kernel, "b1ELb1ELb" + noise, (6 if backward else 3) * size, [step]


def cuda_rows(objects, ops: list, dtypes: list) -> list:
    funcs, regs = cuda_functions(objects), registers(objects)
    rows = []
    for op in ops:
        for label in dtypes:
            tag, size, vec = _CUDA_DTYPES[label]
            kernel, mode, nbytes, passes = _cuda_spec(op, size, vec)
            name = next((n for n in funcs if kernel + tag + mode in n), None)
            if name is None:
                raise KeyError(f"no {kernel} for {label} in {objects}")
            instrs = parse(funcs[name])
            measured = []
            for marker, needs, elems, outer in passes:
                inner = innermost_loop(instrs, marker)
                measured.append((constrained_path(instrs, *inner, needs), elems))
                if outer is not None:
                    measured.append((outer_overhead(instrs, inner, outer), _SITE_RUN_ELEMS))
            rows.append(Row("cuda", op, label, kernel, [measured], nbytes, [regs[name]],
                            [local_memory_ops(funcs[name])]))
    return rows


# ---------------------------------------------------------------------------------------------
# Triton: each op's launcher runs on CPU tensors in a child process (no TRITON_INTERPRET: an
# interpreted @triton.jit cannot be compiled), every `kernel[grid](...)` recorded instead of
# launched, so the kernels, their arguments, constexprs and num_warps are whatever the launchers
# use today; each recorded launch is compiled for sm_90 with the specialization Triton would give
# those arguments, and its SASS and resource usage come back.
# ---------------------------------------------------------------------------------------------

_TRITON_CHILD = textwrap.dedent(
    """
    import json, os, subprocess, sys, tempfile
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    ce = __import__("dropreg_ext.triton_kernels.cross_entropy", fromlist=["_"])
    site = __import__("dropreg_ext.triton_kernels.site_penalty", fromlist=["_"])
    dropout = __import__("dropreg_ext.triton_kernels.dropout", fromlist=["_"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
    recorded = []

    # Every launch ends in JITFunction.run, whether through kernel[grid], a heuristics or autotune
    # wrapper (which adds its constexprs first) or a launcher built by wrap_triton.
    def record(self, *args, grid, warmup=False, **kwargs):
        recorded.append((self, grid, args, kwargs))

    JITFunction.run = record

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
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        shown = {k: v for k, v in constexprs.items() if isinstance(v, (bool, int))}
        return {"kernel": fn.__name__, "sass": sass, "resources": res, "ttgir": kernel.asm["ttgir"],
                "num_warps": options["num_warps"], "constexprs": shown}

    out = []
    for op, dtype, shape in json.loads(sys.stdin.read()):
        dt = getattr(torch, dtype)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        rng = torch.zeros(2, dtype=torch.int64)
        if op == "dropout":
            x, n = torch.zeros(shape, dtype=dt), shape[0]
            call = {"dropout": lambda: dropout.dropout(x, 0.3, rng)}
        elif op.startswith("site"):
            h, n = torch.zeros(shape, dtype=dt), shape[0]
            grad = torch.zeros(2, dtype=acc)
            noise = op.split()[1]
            call = {f"site_penalty {noise}": lambda: site.site_penalty(h, h, h, 0.3, noise, rng),
                    f"site_penalty_backward {noise}":
                        lambda: site.site_penalty_backward(grad, h, h, h, 0.3, noise, rng)}
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

TRITON_DROPOUT = [("dropout", dtype, [2**24]) for dtype in ("float64", "float32", "bfloat16")]
TRITON_REGULARIZER = [
    (op, dtype, shape)
    for op, shape in [("cross_entropy_sample", [64, 50257]), ("cross_entropy_sample_grad", [64, 50257]),
                      ("ce_grad", [64, 50257]), ("ce_grad_backward", [64, 50257]),
                      ("site_penalty rademacher", [2**22]), ("site_penalty dropout", [2**22]),
                      ("site_penalty_backward rademacher", [2**22]), ("site_penalty_backward dropout", [2**22])]
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


def triton_rows(cases: list) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", _TRITON_CHILD], input=json.dumps(cases), capture_output=True,
                           text=True, env=env, check=True)
    ops = {}  # (op, dtype) -> [(kernel description, paths, elements, element tensors, regs, spills)]
    for launch in json.loads(child.stdout.strip().splitlines()[-1]):
        if _BOOKKEEPING.search(launch["kernel"]):
            continue
        instrs = parse(launch["sass"])
        per_thread = _element_tile(launch["ttgir"], launch["dtype"]) / (32 * launch["num_warps"])
        needs = [(philox_multiply, 18 * max(1, int(per_thread) // 8))] if "sample" in launch["kernel"] else []
        found = element_loops(instrs)
        if found:
            paths = [constrained_path(instrs, head, back,
                                      needs if any(philox_multiply(i) for i in instrs if head <= i[0] <= back) else [])
                     for head, back in found]
        else:
            paths = [entry_hot_path(instrs)]
        shown = " ".join(f"{k}={v}" for k, v in launch["constexprs"].items())
        regs = [int(m.group(2)) for m in _RESOURCES.finditer(launch["resources"])]
        ops.setdefault((launch["op"], launch["dtype"]), []).append(
            (f"{launch['kernel']} {shown} num_warps={launch['num_warps']}", paths, per_thread, launch["tensors"],
             regs[0] if regs else 0, local_memory_ops(launch["sass"])))
    rows = []
    for (op, dtype), kernels in ops.items():
        size = {"float64": 8, "float32": 4}.get(dtype, 2)
        rows.append(Row("triton", op, _TT_TYPE[dtype], "; ".join(k[0] for k in kernels),
                        [[(path, elems) for path in paths] for _k, paths, elems, *_rest in kernels],
                        size * sum(k[3] for k in kernels), [k[4] for k in kernels], [k[5] for k in kernels]))
    return rows


def dropout_rows(objects) -> list:
    return cuda_rows(objects, ["dropout"], DROPOUT_DTYPES) + triton_rows(TRITON_DROPOUT)


def regularizer_rows(objects) -> list:
    return cuda_rows(objects, CUDA_REGULARIZER, REGULARIZER_DTYPES) + triton_rows(TRITON_REGULARIZER)


def built_extension() -> list:
    """The extension of this tree (dropreg_ext/_C*.so), if built."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return glob.glob(os.path.join(root, "dropreg_ext", "_C*.so"))[:1]


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", choices=["dropout", "regularizer", "all"], default="all")
    parser.add_argument("--so", nargs="+", help="the built extension or object files (default: dropreg_ext/_C*.so "
                                                "of this tree)")
    parser.add_argument("--out-dir", help="also write the tables to DIR/dropout_sm90.md and DIR/regularizer_sm90.md")
    args = parser.parse_args(argv)
    objects = args.so or built_extension()
    if not objects:
        print("python -m bench.sass: no built extension found (make build)", file=sys.stderr)
        return 2
    tables = {}
    if args.kernels in ("dropout", "all"):
        tables["dropout_sm90.md"] = NOTES + "\n" + render(dropout_rows(objects))
    if args.kernels in ("regularizer", "all"):
        tables["regularizer_sm90.md"] = NOTES + "\n" + render(regularizer_rows(objects))
    for name, text in tables.items():
        print(text + "\n")
        if args.out_dir:
            with open(os.path.join(args.out_dir, name), "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
