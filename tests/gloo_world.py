"""Run a test module's ``_worker(rank, world_size, init_file, out_file)`` in one process per rank (gloo on
CPU, rendezvous through a file) and return what each rank saved."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_ranks(module: str, tmp: Path, world_size: int, timeout_s: int) -> list:
    init_file = tmp / "filestore"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    procs = []
    for rank in range(world_size):
        code = textwrap.dedent(f"""
            from {module} import _worker
            _worker({rank}, {world_size}, {str(init_file)!r}, {str(tmp / f"rank{rank}.pt")!r})
        """)
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(env, RANK=str(rank)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout_s)[1])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"distributed workers did not finish within {timeout_s} s")
    for rank, (proc, err) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed (exit {proc.returncode}):\n{err[-4000:]}"
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def serve_rank(rank: int, world_size: int, init_file: str, out_file: str, jobs: dict, timeout_s: int,
               result: dict | None = None) -> None:
    """In a rank's process: join the gloo world, run ``jobs`` (name -> callable) in order into ``result``,
    leave the world and save ``result`` for the launcher."""
    import torch.distributed as dist

    result = {} if result is None else result
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        for name, job in jobs.items():
            result[name] = job()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, out_file)
