"""Where and with what a run happens: device name and tag, library versions, date, and the git commit
of the code that ran.

Every result row carries these fields (:func:`row_tags`), so a CSV row read alone still says what
produced it; every ``results.json`` (the benchmarks' and the reproduction's) has :func:`git_state` in
its meta.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess

import torch

import dropreg_ext as dr


def cpu_count() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (how many runnable processes share the cores), -1 if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({cpu_count()} cores, {torch.get_num_threads()} threads)"


def cpu_vendor() -> str:
    """``amd`` or ``intel`` from the CPU's model name; empty where it names neither."""
    match = re.search(r"\b(AMD|Intel)\b", _cpu_model(), re.IGNORECASE)
    return match.group(1).lower() if match else ""


def device_tag(device: torch.device) -> str:
    """Short folder name for a device: ``cpu-2core-amd``, ``cpu-2core-intel``, ``cuda-h200``;
    ``cpu-2core-amd-noavx512`` where the CPU kernels run narrower loops (no AVX-512 on the CPU, or
    ``DROPREG_CPU_CAPABILITY=avx2`` or ``=default``), so that such a run does not replace the AVX-512
    machine's results. The vendor keeps one CPU's results from replacing another's: fault costs and
    the floors differ between them (docs in csrc/cpu/fresh_output.h)."""
    if device.type == "cuda":
        words = re.sub(r"(?i)\bnvidia\b", "", torch.cuda.get_device_name(device)).split()
        model = re.sub(r"[^a-z0-9]+", "-", words[0].lower()) if words else "gpu"
        return f"cuda-{model}"
    narrower = cpu_path() != "avx512"
    vendor = cpu_vendor()
    return f"cpu-{cpu_count()}core" + (f"-{vendor}" if vendor else "") + ("-noavx512" if narrower else "")


def cpu_path() -> str:
    """The CPU kernels' vector loops in this process: ``avx512``, ``avx2`` or ``default``."""
    return dr.build_info()["cpu_dropout_path"]


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"torch": torch.__version__, "triton": triton_version, "dropreg_ext": dr.__version__}


def row_tags(device: torch.device) -> dict:
    """Fields stamped on every result row: device, versions and the date of the run."""
    return {
        "device": device_name(device),
        "device_tag": device_tag(device),
        **versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def omp_wait_policy() -> str:
    """The OpenMP wait policy of this process (bench/__init__.py sets PASSIVE unless the caller chose)."""
    return os.environ.get("OMP_WAIT_POLICY", "-")


def versions_line(tags: dict) -> str:
    return f"torch {tags['torch']}, triton {tags['triton']}, dropreg_ext {tags['dropreg_ext']}"


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Outputs, not what was measured: a refresh or a resumed reproduction rewrites them as it runs.
RESULT_FOLDERS = ("bench/results", "repro/results")


def git_state(root: str = REPO_ROOT) -> dict:
    """``{"commit": full hash of HEAD, "dirty": True if tracked files differ from it}`` for the
    repository at ``root`` (this code's); ``{"commit": None, "dirty": None}`` outside a git work tree
    (e.g. an unpacked copy without .git) or without git. Untracked files and the results folders
    (RESULT_FOLDERS) do not count as dirty."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      *(f":(exclude){folder}" for folder in RESULT_FOLDERS))
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
