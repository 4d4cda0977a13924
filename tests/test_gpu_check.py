"""bench/gpu_check.sh, the one-command GPU run, as far as a machine without a GPU can check it: the
dry run lists every stage with its limit, fits the 7-minute budget, says what is missing and exits
3 with its results packed; the summary reads junit files and benchmark results into one screen;
the ``--check`` benchmark preset exists for every section."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from bench import config, gpu_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_dry_run_lists_stages_and_exits_3(tmp_path):
    env = dict(os.environ, GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    limits = {}
    for line in out.split("gpu_check plan", 1)[1].splitlines()[1:]:
        match = re.match(r"\s+([a-z-]+)\s+(\d+) s", line)
        if match:
            limits[match.group(1)] = int(match.group(2))
    assert list(limits) == ["machine", "build", "cuda-tests", "crash-probe", "regularizer", "bench-train",
                            "triton-tests", "bench-dropout", "bench-ce", "kernels", "bench-site", "summary"]
    assert sum(limits.values()) <= 420, f"stage limits add up to {sum(limits.values())} s > 7 min"
    assert "cannot run the GPU check" in out and "missing" in out
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.tgz", "summary.txt"]
    with tarfile.open(tmp_path / "out" / "gpu_check.tgz") as tar:
        names = tar.getnames()
    assert "./machine.txt" in names and "./stages.tsv" in names and "./logs/machine.log" in names


def _junit(path, cases):
    failures = sum(1 for _, outcome in cases if outcome == "failed")
    skipped = sum(1 for _, outcome in cases if outcome == "skipped")
    body = []
    for name, outcome in cases:
        inner = {"failed": '<failure message="AssertionError: bits differ">trace</failure>',
                 "skipped": '<skipped message="needs a CUDA device"/>', "passed": ""}[outcome]
        body.append(f'<testcase classname="tests.test_x" name="{name}">{inner}</testcase>')
    path.write_text(f'<testsuites><testsuite tests="{len(cases)}" failures="{failures}" errors="0" '
                    f'skipped="{skipped}">{"".join(body)}</testsuite></testsuites>')


def test_summary_reads_stages_tests_and_bench(tmp_path):
    (tmp_path / "junit").mkdir()
    (tmp_path / "machine.txt").write_text("GPU: NVIDIA H200, capability (9, 0)\ntriton 3.6.0\n")
    (tmp_path / "stages.tsv").write_text("machine\t10\t2\t0\ncuda-tests-test_dropout\t14\t14\t124\n")
    _junit(tmp_path / "junit" / "cuda-tests-test_dropout.xml",
           [("test_a[cuda]", "passed"), ("test_b[cuda]", "failed"), ("test_c", "skipped")])
    (tmp_path / "bench-dropout").mkdir()
    row = {"section": "dropout", "provider": "cuda", "mode": "fwd", "dtype": "float32", "numel": 2**26,
           "pct_copy": 87.4, "speedup_vs_eager": 1.9, "speedup_vs_compile": 1.2, "median_ms": 0.1}
    (tmp_path / "bench-dropout" / "results.json").write_text(json.dumps({"rows": [row, {**row, "provider": "eager"}]}))
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.txt").read_text()
    assert "GPU: NVIDIA H200" in text
    assert re.search(r"cuda-tests-test_dropout\s+14s\s+14s\s+TIMEOUT", text)
    assert re.search(r"all test files\s+1 passed\s+1 failed\s+1 skipped", text)
    assert "tests.test_x::test_b[cuda]: AssertionError: bits differ" in text
    assert "bench-dropout: float32 2^26 cuda" in text and "fwd 87%" in text and "fwd x1.90/x1.20" in text
    assert "eager " not in text.split("bench-dropout:", 1)[1], "only our backends get a bandwidth line"
    assert "device time per call" not in text  # bench.gpu_kernels did not run
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "kernels.json").write_text(json.dumps({"rows": [
        {"case": "dropout cuda float32 2^26", "bytes": 2**29, "us_per_call": 140.0, "gbps": 3835.0, "pct_copy": 91.5},
        {"case": "ce backward triton bfloat16 2048x32000", "bytes": 1, "error": "RuntimeError: capture failed"}]}))
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.txt").read_text()
    assert re.search(r"dropout cuda float32 2\^26\s+140.0 us\s+92% of copy", text)
    assert re.search(r"ce backward triton bfloat16 2048x32000\s+RuntimeError: capture failed", text)
    merged = json.loads((tmp_path / "results.json").read_text())  # the layout bench.report renders
    assert [r["provider"] for r in merged["rows"]] == ["cuda", "eager"]
    assert merged["meta"]["command"] == "bash bench/gpu_check.sh (bench-dropout)"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_check_preset_has_every_section(device):
    cfg = config.make_config("check", torch.device(device))
    assert cfg.sizes and cfg.ce_shapes and cfg.site_sizes
    assert 2**24 in cfg.sizes["float32"], "the dropout acceptance size"
    assert (2048, 10_000) in cfg.ce_shapes["float32"], "the cross-entropy acceptance shape"


SYNTHETIC_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/              @!P0 BRA 0x60 ;
        /*0030*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*0050*/                   BRA 0x70 ;
        /*0060*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0070*/                   IMAD.WIDE.U32 R6, R4, 0x3, RZ ;
        /*0080*/                   ISETP.GE.AND P1, PT, R2, R9, PT ;
        /*0090*/              @!P1 BRA 0x10 ;
        /*00a0*/                   EXIT ;
"""


def test_sass_hot_path_takes_the_short_branch():
    """The loop's hot path skips the scalar branch: 0x10, 0x20, 0x60, 0x70, 0x80, 0x90."""
    from bench import sass

    path = sass.loop_hot_path(sass.parse(SYNTHETIC_SASS))
    assert [addr for addr, *_ in path] == [0x10, 0x20, 0x60, 0x70, 0x80, 0x90]
    assert [addr for addr, *_ in sass.entry_hot_path(sass.parse(SYNTHETIC_SASS))][-1] == 0xA0


# A loop whose body a diverged warp may leave (BRA.DIV) for code after EXIT, which branches back.
DIVERGENT_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STS.128 [R2], R4 ;
        /*0020*/                   BRA.DIV UR4, 0x80 ;
        /*0030*/                   NOP ;
        /*0040*/                   LDS.64 R6, [R3] ;
        /*0050*/                   ISETP.GE.AND P1, PT, R2, R9, PT ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
        /*0080*/                   WARPSYNC.COLLECTIVE R8, 0xa0 ;
        /*0090*/                   ENDCOLLECTIVE ;
        /*00a0*/                   BRA 0x40 ;
"""


def test_sass_loops_skip_the_divergence_handler():
    """The handler's branch back into the body is no loop, and BRA.DIV may fall through: the hot path
    of the loop is 0x10 .. 0x60 straight."""
    from bench import sass

    instrs = sass.parse(DIVERGENT_SASS)
    assert sass.loops(instrs) == [(0x10, 0x60)]
    assert [addr for addr, *_ in sass.loop_hot_path(instrs)] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x60]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_gpu_kernels_without_cuda_says_so_and_exits_3(capsys):
    from bench import gpu_kernels

    assert gpu_kernels.main([]) == 3
    assert "needs a CUDA device" in capsys.readouterr().err
