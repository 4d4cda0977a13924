"""``make sdist-check``: the source release builds, installs and imports, and an isolated build stops.

1. ``python -m build --sdist`` in build's isolated environment, which has no torch: making the
   source release must not need one.
2. A fresh venv (``--without-pip``) whose ``.pth`` file puts this interpreter's site-packages on its
   path, so it reuses the installed torch (no download) while the package goes into its own
   site-packages; the sdist installed there with ``pip install --no-build-isolation --no-deps``,
   CPU kernels only (``DROPREG_CUDA=0``).
3. In that venv, from outside the source tree: the package imported from the venv, with the
   compiled extension loaded, and one op bit for bit against the reference.
4. The same sdist built under pip's default isolation: it must stop with the message that says to
   use ``--no-build-isolation``, not build against another torch.

Usage: ``python .ci/sdist_check.py WORKDIR`` (WORKDIR is emptied first). Prints each step's seconds.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT_CHECK = """
import os, sys, torch
import dropreg_ext as dr
from dropreg_ext import _ext, reference
package = os.path.realpath(dr.__file__)
assert package.startswith(os.path.realpath(sys.prefix) + os.sep), f"imported {package}, not the venv's"
assert _ext.HAS_CPU, "the compiled extension dropreg_ext._C is not loaded"
x, rng = torch.randn(4097), dr.ops.make_rng("cpu", 7)
assert torch.equal(dr.ops.fused_dropout(x, 0.3, rng, backend="cpu"), reference.dropout(x, 0.3, rng))
print(f"imported {package} with dropreg_ext._C built against torch {_ext.BUILD_INFO['torch']}")
"""


def run(what: str, cmd: list, cwd: str, env=None, expect_failure: bool = False) -> str:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    failed = result.returncode != 0
    if failed != expect_failure:
        sys.exit(f"sdist-check: {what}: exit status {result.returncode}\n$ {' '.join(cmd)}\n{output[-6000:]}")
    print(f"sdist-check: {what}: {time.perf_counter() - start:.1f} s", flush=True)
    return output


def main(workdir: str) -> None:
    workdir = os.path.abspath(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    dist, venv = os.path.join(workdir, "dist"), os.path.join(workdir, "venv")
    os.makedirs(dist)

    run("build the sdist (isolated, no torch)", [sys.executable, "-m", "build", "--sdist", "--outdir", dist, ROOT],
        cwd=ROOT)
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))

    run("create a fresh venv", [sys.executable, "-m", "venv", "--without-pip", venv], cwd=workdir)
    python = os.path.join(venv, "bin", "python")
    venv_site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip()
    ours = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    with open(os.path.join(venv_site, "installed_torch.pth"), "w") as pth:
        pth.write("".join(f"{path}\n" for path in sorted(ours)))

    env = dict(os.environ, DROPREG_CUDA="0")
    run("install the sdist (--no-build-isolation, CPU kernels)",
        [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", sdist], cwd=workdir, env=env)
    print(run("import it", [python, "-c", IMPORT_CHECK], cwd=workdir).strip())

    output = run("an isolated build stops", [python, "-m", "pip", "wheel", "--no-deps", "-w", dist, sdist],
                 cwd=workdir, env=env, expect_failure=True)
    if "no torch can be imported here" not in output or "--no-build-isolation" not in output:
        sys.exit(f"sdist-check: the isolated build failed, but not with setup.py's message:\n{output[-6000:]}")


if __name__ == "__main__":
    main(sys.argv[1])
