"""What every results.json records of the tree it measured (bench/env.py's git_state): the commit, and
whether the code differed from it; the results folders, which a refresh rewrites as it runs, do not
count."""

from __future__ import annotations

import subprocess

from bench import env


def _git(root, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_counts_code_not_results(tmp_path):
    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "repro" / "results").mkdir(parents=True)
    files = {name: repo / name for name in ("kernel.py", "bench/results/results.json", "repro/results/results.json")}
    for path in files.values():
        path.write_text("0\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    head = _git(repo, "rev-parse", "HEAD")
    assert env.git_state(str(repo)) == {"commit": head, "dirty": False}
    files["bench/results/results.json"].write_text("1\n")
    files["repro/results/results.json"].write_text("1\n")
    (repo / "untracked.py").write_text("1\n")
    assert env.git_state(str(repo)) == {"commit": head, "dirty": False}
    files["kernel.py"].write_text("1\n")
    assert env.git_state(str(repo)) == {"commit": head, "dirty": True}


def test_git_state_outside_a_work_tree(tmp_path):
    assert env.git_state(str(tmp_path)) == {"commit": None, "dirty": None}
