"""The build and the import: ``python -m dropreg_ext.info``, CUDA kernels compiled wherever they can
be, and the graceful fallback to the reference when ``dropreg_ext._C`` cannot be loaded."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import dropreg_ext as dr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(args, timeout=120):
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def test_build_info_dict():
    info = dr.build_info()
    assert info["dropreg_ext"] == dr.__version__
    assert info["torch_installed"] == torch.__version__
    assert info["backend"] == dr.get_backend()
    assert info["extension_loaded"] is dr._ext.HAS_CPU
    if dr._ext.HAS_CPU:
        built = info["built_against"]
        assert built["torch"] == torch.__version__
        assert "cpu" in built["backends"]
        assert set(built["backends"]) <= {"cpu", "cuda"}


def test_info_module_lists_built_backends():
    out = _run_python(["-m", "dropreg_ext.info"]).stdout
    assert f"dropreg_ext {dr.__version__}" in out
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    if dr._ext.HAS_CPU:
        listed = [b.strip() for b in lines["compiled backends"].split(",")]
        assert listed == dr._ext.BUILD_INFO["backends"]
    usable = [b.strip() for b in lines["backends usable on cpu"].split(",")]
    assert usable == dr.ops.available_backends("cpu")


def _nvcc():
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None
    )


def test_cuda_kernels_built_where_possible():
    """Where torch has CUDA and an nvcc exists, the build must include the CUDA kernels, GPU or
    not (setup.py builds them without a GPU). DROPREG_CUDA=0 is the documented opt-out."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build")
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc found")
    if os.environ.get("DROPREG_CUDA") == "0":
        pytest.skip("DROPREG_CUDA=0: CPU-only build requested")
    assert dr._ext.HAS_CPU, "dropreg_ext._C is not loaded"
    assert "cuda" in dr._ext.BUILD_INFO["backends"], (
        f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is at {nvcc}, but the extension "
        f"was built with backends {dr._ext.BUILD_INFO['backends']}: rebuild without DROPREG_CUDA=0"
    )


def test_default_archs_embed_ptx():
    """setup.py's default arch list ends in +PTX: the compute_90 PTX lets GPUs newer than the listed
    archs (sm_100, sm_120) JIT the kernels instead of failing with "no kernel image"."""
    source = open(os.path.join(ROOT, "setup.py")).read()
    match = re.search(r'^DEFAULT_ARCHS = "([^"]+)"', source, re.M)
    assert match, "setup.py defines DEFAULT_ARCHS"
    assert match.group(1).split(";")[-1].endswith("+PTX"), match.group(1)


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def test_built_extension_holds_the_recorded_archs():
    """The compiled extension carries machine code (ELF) for every arch its build info lists, and
    PTX exactly when the list asks for it (+PTX): read from the .so with cuobjdump."""
    if not dr._ext.HAS_CUDA:
        pytest.skip("extension built without CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (triton bundles one)")
    archs = dr._ext.BUILD_INFO["cuda_archs"].split(";")
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", dr._ext.C.__file__], capture_output=True,
                             text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    for arch in archs:
        sm = arch.replace("+PTX", "").replace(".", "")
        assert f"sm_{sm}" in listing.stdout, f"no sm_{sm} machine code in {dr._ext.C.__file__}"
    ptx = {line.split("sm_")[-1].split(".")[0] for line in listing.stdout.splitlines() if ".ptx" in line}
    want_ptx = {a.replace("+PTX", "").replace(".", "") for a in archs if a.endswith("+PTX")}
    assert ptx == want_ptx, f"PTX for {sorted(ptx)}, expected {sorted(want_ptx)}:\n{listing.stdout[:2000]}"


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings

    import torch

    class BlockExtension:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "dropreg_ext._C":
                raise ImportError("blocked by test_build")
            return None

    sys.meta_path.insert(0, BlockExtension())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import dropreg_ext as dr
        import dropreg_ext.nn  # noqa: F401  (a second import must not warn again)

    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    y = dr.functional.dropout(x, 0.5, seed=3)
    expected = dr.reference.dropout(x.detach(), 0.5, dr.ops.make_rng("cpu", 3))
    y.sum().backward()
    print(json.dumps({
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "has_cpu": dr._ext.HAS_CPU,
        "resolved": dr.ops.resolve_backend(x),
        "available": dr.ops.available_backends("cpu"),
        "matches_reference": bool(torch.equal(y.detach(), expected)),
        "grad_is_mask": bool(torch.equal(x.grad != 0, expected != 0)),
        "module_ok": tuple(dr.Dropout(0.2)(torch.randn(3, 4)).shape) == (3, 4),
        "info_loaded": dr.build_info()["extension_loaded"],
    }))
    """
)


def test_import_falls_back_when_extension_missing():
    out = _run_python(["-c", FALLBACK_SCRIPT]).stdout
    report = json.loads(out.strip().splitlines()[-1])
    runtime = [msg for kind, msg in report["warnings"] if kind == "RuntimeWarning"]
    assert len(runtime) == 1, f"expected exactly one RuntimeWarning, got {report['warnings']}"
    assert "dropreg_ext._C" in runtime[0] and "rebuild" in runtime[0], runtime[0]
    assert "pip install --no-build-isolation" in runtime[0], runtime[0]
    assert report["has_cpu"] is False and report["info_loaded"] is False
    assert report["resolved"] == "reference"
    assert "cpu" not in report["available"]
    assert report["matches_reference"] and report["grad_is_mask"] and report["module_ok"]


@pytest.mark.skipif(not dr._ext.HAS_CPU, reason="dropreg_ext._C not loaded")
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", sorted(dr.ops.SPECS))
def test_python_backend_schema_is_the_cpp_one(name, backend):
    """The Python backends' ops are typed by ops.py's signatures (they register without the C++
    extension); their arguments (names, types, defaults) and outputs must be csrc/ops.cpp's."""
    if backend not in dr.ops.BACKEND_OPS:
        pytest.skip(f"the {backend} backend is not registered here")

    def shape(qualname: str) -> tuple:
        schema = getattr(torch.ops.dropreg, qualname).default._schema
        return ([(a.name, str(a.type), a.default_value) for a in schema.arguments],
                [str(r.type) for r in schema.returns])

    assert shape(f"{name}_{backend}") == shape(name)
