"""Build dropreg_ext._C: CPU kernels always; CUDA kernels whenever torch has CUDA and nvcc exists.

The extension is compiled against the torch this script imports, which must be the torch that
will import the extension: install torch first, then `pip install --no-build-isolation .`. torch is
not a build requirement (pyproject.toml), so pip's default isolated build environment has none,
and building there stops with a message that says so instead of compiling against a torch
downloaded for the build. Making a source release (sdist) or reading the metadata needs no torch.

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

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    import torch
except ImportError:  # pip's isolated build environment, or no torch at all
    torch = None


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


ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
# The supported range, tested at both ends (make test: 2.14.1; make test-compat: 2.11.0 + triton 3.6.0).
MIN_TORCH = (2, 11)
MIN_TORCH_TEXT = ".".join(map(str, MIN_TORCH))


def _version_tuple(version: str) -> tuple:
    """(2, 11) of "2.11.0+cu130", compared as numbers ("2.10" > "2.9", unlike the strings)."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def _log(msg: str) -> None:
    print(f"[dropreg_ext setup] {msg}", file=sys.stderr)


def _want_cuda(cuda_home) -> bool:
    forced = os.environ.get("DROPREG_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"DROPREG_CUDA must be 0 or 1, got {forced!r}")
    nvcc = cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
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


def _extension(cpp_extension):
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = _want_cuda(cuda_home)
    # checks.cpp: every op's argument checks, compiled by the host compiler for CPU and CUDA alike.
    sources = [
        os.path.join("csrc", name) for name in ("ops.cpp", "checks.cpp", "autograd.cpp", "draw.cpp", "entry.cpp")
    ]
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
        _log(f"building CPU + CUDA kernels (CUDA {torch.version.cuda}, archs {archs}, nvcc in {cuda_home})")
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
        return cpp_extension.CUDAExtension("dropreg_ext._C", sources, extra_compile_args=args, **common)
    return cpp_extension.CppExtension("dropreg_ext._C", sources, extra_compile_args={"cxx": cxx}, **common)


NO_TORCH = (
    "dropreg_ext compiles its extension against the torch that will import it, and no torch can be "
    "imported here. pip builds in an isolated environment by default, one without torch (torch is "
    "deliberately not a build requirement, so that the build never uses another torch than yours): "
    f"install torch >= {MIN_TORCH_TEXT} first, then build with --no-build-isolation, "
    "e.g. `pip install --no-build-isolation dropreg_ext` (or `pip install --no-build-isolation .` in a "
    "source tree)."
)


class _NoTorchBuildExt(build_ext):
    """build_ext where torch cannot be imported: stops with NO_TORCH before compiling anything."""

    def run(self) -> None:
        raise SystemExit(NO_TORCH)


def _build() -> tuple:
    """(ext_modules, cmdclass): dropreg_ext._C against the importable torch, or, without one, a
    placeholder whose build stops with NO_TORCH (a source release and the metadata need no torch)."""
    if torch is None:
        return [Extension("dropreg_ext._C", sources=[])], {"build_ext": _NoTorchBuildExt}
    if _version_tuple(torch.__version__) < MIN_TORCH:
        raise SystemExit(f"dropreg_ext needs torch >= {MIN_TORCH_TEXT}, found torch {torch.__version__}")
    _locate_cuda_home()
    # cpp_extension reads CUDA_HOME when imported, so it comes after _locate_cuda_home().
    from torch.utils import cpp_extension

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExt(base):
        """An editable build (``pip install -e``, ``make build``) keeps its objects in build/temp of the
        source tree, where ninja finds them next time: setuptools gives it a new temporary folder
        each time, which made every rebuild compile every file (minutes of nvcc for one changed line)."""

        def finalize_options(self) -> None:
            super().finalize_options()
            if getattr(self, "editable_mode", False) or self.inplace:
                self.build_temp = os.path.join(ROOT, "build", "temp")

    return [_extension(cpp_extension)], {"build_ext": BuildExt}


ext_modules, cmdclass = _build()


setup(
    name="dropreg_ext",
    version="0.1.0",
    description="Fused dropout and dropout's explicit/implicit regularizers (Wei, Kakade & Ma 2020)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dropreg_ext", "dropreg_ext.*"]) + ["dropreg_ext.triton_kernels"],
    package_dir={"dropreg_ext.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[f"torch>={MIN_TORCH_TEXT}"],
    extras_require={"triton": ["triton>=3.6"]},
)
