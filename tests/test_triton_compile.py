"""Every Triton kernel compiles for an H100/H200 (sm_90) — checked without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' semantics on the CPU but skips the GPU
compiler, which rejects things the interpreter accepts (e.g. annotated module-level constants). So
CI also compiles each kernel ahead of time through Triton's own ptxas, for the dtypes we launch.
On a machine with a GPU the real kernels run in the other tests, and this file is skipped.
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real kernels")

# Compile in a child process: the parent runs under TRITON_INTERPRET=1, where @triton.jit gives
# interpreted functions that cannot be compiled.
_CHILD = textwrap.dedent(
    """
    import importlib, json, sys, traceback
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = {}
    for case_id, name, sig, constexprs, div16, warps in json.loads(sys.stdin.read()):
        module, fn = name.rsplit(".", 1)
        kernel = getattr(importlib.import_module(module), fn)
        names = list(sig)
        attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in div16}
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        except Exception:
            failures[case_id] = traceback.format_exc()[-2000:]
    print(json.dumps(failures))
    """
)

T = {"f64": "fp64", "f32": "fp32", "bf16": "bf16"}


def _cases():
    dropout = importlib.import_module("dropreg_ext.triton_kernels.dropout")
    for dt, t in T.items():
        acc = "fp64" if t == "fp64" else "fp32"
        bits = "i64" if acc == "fp64" else "i32"  # a float argument's bits (_launch.float_bits)
        block = dropout.BYTES_PER_PROGRAM // {"f64": 8, "f32": 4, "bf16": 2}[dt]
        yield f"dropout-{dt}", "dropreg_ext.triton_kernels.dropout._dropout_kernel", {
            "x_ptr": "*" + t, "y_ptr": "*" + t, "rng_ptr": "*i64", "n": "i64", "threshold": "i32",
            "scale_bits": bits, "BLOCK": "constexpr"}, {"BLOCK": block}, 4
        yield f"site_penalty-{dt}", "dropreg_ext.triton_kernels.site_penalty._site_penalty_kernel", {
            "h_ptr": "*" + t, "ge_ptr": "*" + t, "gi_ptr": "*" + t, "up_bits": bits, "rng_ptr": "*i64",
            "partial_ptr": "*" + acc, "n": "i32", "threshold": "i64", "HAS_GE": "constexpr",
            "HAS_GI": "constexpr", "RADEMACHER": "constexpr", "BLOCK": "constexpr", "ROW": "constexpr"}, {
            "HAS_GE": True, "HAS_GI": True, "RADEMACHER": True, "BLOCK": 4096, "ROW": 128}, 16
        yield f"site_penalty_backward-{dt}", "dropreg_ext.triton_kernels.site_penalty._site_penalty_backward_kernel", {
            "grad_ptr": "*" + acc, "h_ptr": "*" + t, "ge_ptr": "*" + t, "gi_ptr": "*" + t, "up_bits": bits,
            "rng_ptr": "*i64", "dh_ptr": "*" + t, "dge_ptr": "*" + t, "dgi_ptr": "*" + t, "n": "i32",
            "threshold": "i64", "HAS_GE": "constexpr", "HAS_GI": "constexpr", "RADEMACHER": "constexpr",
            "BLOCK": "constexpr", "ROW": "constexpr"}, {"HAS_GE": True, "HAS_GI": True, "RADEMACHER": False,
                                                     "BLOCK": 1024, "ROW": 8}, 4
    yield "philox_raw", "dropreg_ext.triton_kernels.philox._philox_raw_kernel", {
        "counter_ptr": "*i64", "key_ptr": "*i64", "out_ptr": "*i64", "n": "i32", "BLOCK": "constexpr"}, {
        "BLOCK": 128}, 4
    yield "sum_partials", "dropreg_ext.triton_kernels.site_penalty._sum_partials_kernel", {
        "partial_ptr": "*fp32", "out_ptr": "*fp32", "n_programs": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4


def _cross_entropy_cases():
    """The cross-entropy kernels as their launchers launch them: the sample kernels at each C's plan
    (many rows; few rows, where long rows are split), ce_grad and ce_grad_backward at theirs. Pointers
    are 16-byte aligned and C divisible by 16 where it is, as Triton specializes them at run time."""
    ce = importlib.import_module("dropreg_ext.triton_kernels.cross_entropy")
    module = "dropreg_ext.triton_kernels.cross_entropy."
    for c in (200, 1000, 10000, 50257, 131072):
        for dt, t in (("f32", "fp32"), ("bf16", "bf16"), ("f64", "fp64")):
            if dt == "f64" and c not in (1000, 50257):
                continue
            acc = "fp64" if t == "fp64" else "fp32"
            c16 = ["n_cols"] if c % 16 == 0 else []
            p = ce._sample_plan(4096, c)  # many rows: one program per row (or per ROWS rows)
            for grad in (False, True):
                sig = {"z_ptr": "*" + t, "target_ptr": "*i64", "rng_ptr": "*i64", "loss_ptr": "*" + acc,
                       "lse_ptr": "*" + acc, "yhat_ptr": "*i64", "g_ptr": "*" + t, "n_rows": "i32",
                       "n_cols": "i32", "ignore_index": "i32", "ROWS": "constexpr", "BLOCK_G": "constexpr",
                       "ONE_CHUNK": "constexpr", "ALIGNED": "constexpr", "GRAD": "constexpr"}
                cx = {"ROWS": p.rows, "BLOCK_G": p.block // 4, "ONE_CHUNK": p.one_chunk, "ALIGNED": p.aligned,
                      "GRAD": grad}
                yield (f"sample{'_grad' * grad}-C{c}-{dt}", module + "_cross_entropy_sample_kernel", sig, cx,
                       [a for a in sig if a.endswith("_ptr")] + c16, p.num_warps)
            p = ce._sample_plan(8, c)  # few rows: long ones are split
            if p.splits > 1:
                sig = {"z_ptr": "*" + t, "target_ptr": "*i64", "rng_ptr": "*i64", "part_ptr": "*" + acc,
                       "col_ptr": "*i32", "n_cols": "i32", "split_cols": "i32", "ignore_index": "i32",
                       "BLOCK_G": "constexpr", "ALIGNED": "constexpr"}
                yield (f"split-C{c}-{dt}", module + "_cross_entropy_sample_split_kernel", sig,
                       {"BLOCK_G": p.block // 4, "ALIGNED": p.aligned},
                       [a for a in sig if a.endswith("_ptr")] + c16 + ["split_cols"], p.num_warps)
            if c == 50257:
                sig = {"z_ptr": "*" + t, "target_ptr": "*i64", "part_ptr": "*" + acc, "col_ptr": "*i32",
                       "loss_ptr": "*" + acc, "lse_ptr": "*" + acc, "yhat_ptr": "*i64", "n_rows": "i32",
                       "n_cols": "i32", "n_splits": "i32", "ignore_index": "i32", "BLOCK_R": "constexpr"}
                yield (f"merge-{dt}", module + "_merge_splits_kernel", sig, {"BLOCK_R": 128},
                       [a for a in sig if a.endswith("_ptr")], 4)
            block = ce._block(c)
            rows = max(1, ce.ROW_TILE // block)
            sig = {"z_ptr": "*" + t, "lse_ptr": "*" + acc, "label_ptr": "*i64", "scale_ptr": "*" + acc,
                   "g_ptr": "*" + t, "n_rows": "i32", "n_cols": "i32", "stride_z": "i32", "ignore_index": "i32",
                   "ROWS": "constexpr", "BLOCK": "constexpr"}
            yield (f"ce_grad-C{c}-{dt}", module + "_ce_grad_kernel", sig, {"ROWS": rows, "BLOCK": block},
                   [a for a in sig if a.endswith("_ptr")] + (c16 and ["n_cols", "stride_z"]),
                   ce._num_warps(rows * block))
            one = c <= block
            rows = rows if one else 1
            sig = {"u_ptr": "*" + t, "z_ptr": "*" + t, "lse_ptr": "*" + acc, "label_ptr": "*i64",
                   "scale_ptr": "*" + acc, "grad_z_ptr": "*" + t, "grad_scale_ptr": "*" + acc, "n_rows": "i32",
                   "n_cols": "i32", "ignore_index": "i32", "ROWS": "constexpr", "BLOCK": "constexpr",
                   "ONE_CHUNK": "constexpr"}
            yield (f"ce_grad_backward-C{c}-{dt}", module + "_ce_grad_backward_kernel", sig,
                   {"ROWS": rows, "BLOCK": block, "ONE_CHUNK": one},
                   [a for a in sig if a.endswith("_ptr")] + c16, ce._num_warps(rows * block))


def _all_cases():
    """(id, kernel, signature, constexprs, arguments divisible by 16, num_warps) of every case."""
    for case_id, name, sig, constexprs, warps in _cases():
        yield case_id, name, sig, constexprs, [], warps
    yield from _cross_entropy_cases()


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    if importlib.util.find_spec("triton.compiler") is None:
        pytest.skip("this Triton has no ahead-of-time compiler API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = list(_all_cases())
    assert len({case[0] for case in cases}) == len(cases)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps(cases), env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "kernels that do not compile for sm_90:\n" + "\n".join(
        f"--- {case}\n{trace}" for case, trace in failures.items()
    )


# torch.compile traces into the Triton launchers (torch.library.triton_op): the launcher runs on
# fake tensors, which have no address, and each launch goes through torch's mutation analysis,
# which lowers the kernel to TTIR with its scalar arguments as Python constants. The child traces
# every Triton op as opcheck's aot_dispatch_dynamic test does (AOTAutograd, dynamic shapes) and
# stops before anything runs; the active target is set to sm_90, as torch's analysis asks for it.
_TRACE_CHILD = textwrap.dedent(
    """
    import json, logging, traceback
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(Sm90())
    import dropreg_ext as dr
    from torch._functorch.aot_autograd import aot_function

    class Traced(Exception):
        pass

    def stop(graph, example_inputs):
        raise Traced()

    analysis_failures = []

    class Record(logging.Handler):
        def emit(self, record):
            if "assuming every input is mutated" in record.getMessage():  # any torch version's wording
                analysis_failures.append(record.getMessage() + " " + str(record.exc_info and record.exc_info[1]))

    logging.getLogger("torch._dynamo").addHandler(Record())
    ops = dr.ops.BACKEND_OPS["triton"]
    rng = dr.ops.make_rng("cpu", 3)

    def cases():
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            acc = torch.float64 if dt == torch.float64 else torch.float32
            x = torch.randn(4, 8, dtype=dt)
            yield f"dropout-{dt}", "dropout", (x, 0.25, rng)
            z, t = torch.randn(3, 40, dtype=dt), torch.tensor([1, -100, 7])
            lse, scale = torch.randn(3, dtype=acc), torch.ones(3, dtype=acc)
            yield f"cross_entropy_sample-{dt}", "cross_entropy_sample", (z, t, rng, -100)
            yield f"cross_entropy_sample_grad-{dt}", "cross_entropy_sample_grad", (z, t, rng, -100, scale)
            yield (f"cross_entropy_sample_grad_backward-{dt}", "cross_entropy_sample_grad_backward",
                   (torch.randn(3, dtype=acc), torch.randn(3, 40, dtype=dt), torch.randn(3, 40, dtype=dt), z, lse,
                    t, scale, -100))
            yield f"ce_grad-{dt}", "ce_grad", (z, lse, t, scale, -100)
            yield f"ce_grad_backward-{dt}", "ce_grad_backward", (torch.randn(3, 40, dtype=dt), z, lse, t, scale, -100)
            h = torch.randn(64, dtype=dt)
            for noise, q in (("rademacher", 0.5), ("dropout", 0.25)):
                yield f"site_penalty-{noise}-{dt}", "site_penalty", (h, h, h, q, noise, rng)
                yield (f"site_penalty_backward-{noise}-{dt}", "site_penalty_backward",
                       (torch.randn(2, dtype=acc), h, h, h, q, noise, rng))
        yield "philox", "philox", (torch.zeros(5, 4, dtype=torch.int64), torch.ones(5, 2, dtype=torch.int64))

    failures = {}
    for case_id, name, args in cases():
        op = ops[name]
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def call(*ts, args=args, op=op, tensors=tensors):
            full = list(args)
            for i, t in zip(tensors, ts):
                full[i] = t
            return op(*full)

        del analysis_failures[:]
        try:
            aot_function(call, fw_compiler=stop, dynamic=True)(*(args[i] for i in tensors))
        except Traced:
            pass
        except Exception:
            failures[case_id] = traceback.format_exc()[-1500:]
        if analysis_failures:
            failures[case_id] = "torch's mutation analysis failed: " + analysis_failures[0][-1500:]
    print(json.dumps(failures))
    """
)


def test_triton_ops_trace_like_torch_compile():
    pytest.importorskip("triton")
    if not hasattr(torch.library, "triton_op"):
        pytest.skip("this torch has no torch.library.triton_op: the Triton ops are opaque custom ops")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _TRACE_CHILD], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "Triton ops that torch.compile cannot trace:\n" + "\n".join(
        f"--- {case}\n{trace}" for case, trace in failures.items()
    )
