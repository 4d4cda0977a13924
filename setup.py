"""Build dropreg_ext._C: CPU kernels always; CUDA kernels whenever torch has CUDA and nvcc exists.

No GPU is needed to build the CUDA kernels. Environment:
  DROPREG_CUDA=0|1        force the CUDA kernels off / on (on fails loudly if it cannot build)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0+PTX": A100 and H100/H200 machine code, plus
                          compute_90 PTX that newer GPUs (sm_100, sm_120) compile when they load it)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import sys

import torch
from setuptools import find_packages, setup


def _locate_cuda_home() -> None:
    # torch takes CUDA_HOME from the directory above `nvcc` on PATH; when that nvcc is a wrapper
    # script (e.g. /usr/local/bin/nvcc) the toolkit headers are elsewhere, so look for the toolkit.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

# cpp_extension reads CUDA_HOME when imported, so it comes after _locate_cuda_home().
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
# The supported range, tested at both ends (make test: 2.14.1; make test-compat: 2.11.0 + triton 3.6.0).
MIN_TORCH = (2, 11)


def _version_tuple(version: str) -> tuple:
    """(2, 11) of "2.11.0+cu130", compared as numbers ("2.10" > "2.9", unlike the strings)."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


if _version_tuple(torch.__version__) < MIN_TORCH:
    raise SystemExit(f"dropreg_ext needs torch >= {'.'.join(map(str, MIN_TORCH))}, found torch {torch.__version__}")


def _log(msg: str) -> None:
    print(f"[dropreg_ext setup] {msg}", file=sys.stderr)


def _want_cuda() -> bool:
    forced = os.environ.get("DROPREG_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"DROPREG_CUDA must be 0 or 1, got {forced!r}")
    nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if not nvcc:
        reasons.append("nvcc was not found (set CUDA_HOME)")
    if forced == "0":
        _log("DROPREG_CUDA=0: building the CPU kernels only")
        return False
    if forced == "1" and reasons:
        raise SystemExit("DROPREG_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    if reasons:
        _log("building the CPU kernels only: " + "; ".join(reasons))
        return False
    return True


def _nvidia_pip_includes() -> list:
    # torch's CUDA headers include cusparse.h, cublas_v2.h, ... which ship in the pip `nvidia`
    # wheels rather than in a local toolkit.
    dirs = []
    for site in {os.path.dirname(os.path.dirname(torch.__file__))}:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _extension():
    with_cuda = _want_cuda()
    # checks.cpp: every op's argument checks, compiled by the host compiler for CPU and CUDA alike.
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "checks.cpp", "autograd.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -ffp-contract=off: no multiply-add fused by the compiler where the kernels round each product and
    # sum on its own (docs/numerics.md); FMAs only where the intrinsics ask for them.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off"]  # torch >= 2.10 headers need C++20
    archs = ""
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += _nvidia_pip_includes()
        _log(f"building CPU + CUDA kernels (CUDA {torch.version.cuda}, archs {archs}, nvcc in {CUDA_HOME})")
    cuda_version = torch.version.cuda if with_cuda else ""
    define = [
        ("DROPREG_TORCH_VERSION", f'"{torch.__version__}"'),
        ("DROPREG_CUDA_VERSION", f'"{cuda_version}"'),
        ("DROPREG_CUDA_ARCHS", f'"{archs}"'),
        ("DROPREG_CUDA_BACKEND", '", \\"cuda\\""' if with_cuda else '""'),
    ]
    # -fopenmp: at::parallel_for is header-inline and runs serially unless OpenMP is enabled here.
    common = dict(include_dirs=include_dirs, define_macros=define, extra_link_args=["-fopenmp"])
    if with_cuda:
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        args = {"cxx": cxx, "nvcc": nvcc}
        return CUDAExtension("dropreg_ext._C", sources, extra_compile_args=args, **common)
    return CppExtension("dropreg_ext._C", sources, extra_compile_args={"cxx": cxx}, **common)


setup(
    name="dropreg_ext",
    version="0.1.0",
    description="Fused dropout and dropout's explicit/implicit regularizers (Wei, Kakade & Ma 2020)",
    packages=find_packages(include=["dropreg_ext", "dropreg_ext.*"]) + ["dropreg_ext.triton_kernels"],
    package_dir={"dropreg_ext.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"]},
)
