"""The two reproduction tasks and their ``--quick`` / ``--full`` configurations.

A task owns its data (on the run's device), builds a freshly initialized model, yields the training
batches of an epoch and evaluates a model on a split. Every method trains the same model from the
same initial weights (``torch.manual_seed(seed)`` before :meth:`build_model`) on the same batches,
with the same optimizer and hyperparameters (no per-method tuning): plain SGD with gradient-norm
clipping for PTB, as AWD-LSTM; SGD with momentum for the MLP.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
from torch import nn

import dropreg_ext as dr

from . import data, models
from .methods import cross_entropy


@dataclass(frozen=True)
class Config:
    """Hyperparameters shared by every method of a run (the task adds its model and data sizes)."""

    epochs: int
    seeds: tuple
    batch_size: int
    lr: float
    clip: Optional[float]  # max global gradient norm; None: no clipping
    weight_decay: float = 0.0
    momentum: float = 0.0
    q: float = 0.4  # drop probability at every site (the paper's q)
    k_values: tuple = (2, 4, 8)  # DROPOUT_k
    k_noise: int = 8  # the k of DROPOUT_k + √(1−1/k)·ξ
    methods: Optional[tuple] = None  # the methods this preset runs; None: all of them
    expected_time: str = ""  # what a run of every method and seed should take (measured or estimated)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PTBConfig(Config):
    emsize: int = 400
    nhid: int = 1150
    nlayers: int = 3
    bptt: int = 70
    eval_batch_size: int = 10
    train_tokens: Optional[int] = None  # a prefix of the split; None: all of it
    valid_tokens: Optional[int] = None
    test_tokens: Optional[int] = None


@dataclass(frozen=True)
class FMNISTConfig(Config):
    hidden: int = 1024
    layers: int = 2
    train_images: int = 2000  # the training subset (small, so that the MLP overfits)
    valid_images: int = 5000  # held out from the 60k training images, disjoint from the subset
    test_images: Optional[int] = None  # None: the full 10k test set
    eval_batch_size: int = 2000
    subset_seed: int = 0  # which images form the subsets (the same for every method and seed)


# The methods the main claims rest on (five seeds in --preset cpu), and those of the --quick presets (the
# methods of the committed quick results).
CORE_METHODS = ("none", "dropout", "dropout_k2", "dropout_k4", "explicit", "explicit_implicit")
QUICK_METHODS = ("none", "dropout", "dropout_k2", "dropout_k4", "dropout_k8", "explicit", "explicit_true",
                 "explicit_implicit", "dropout_k4_noise")

# --quick is sized from measured step costs on 2 shared CPU cores (one worker process per core, one
# thread each): relative to a dropout step, the other methods cost about 0.9 (none), 2, 3.4 and 6.8
# (DROPOUT_2/4/8), 2 to 2.3 (explicit), 3.3 (explicit + implicit) and 6 (DROPOUT_4 + ξ): about 28
# dropout-runs of work per seed. --full's times are estimates (no GPU run was made): for PTB, from
# the per-method GPU hours logged by a public rerun of the authors' code (paper.md §4: about 1 h for
# 51 epochs of dropout, 2.5 h for DROPOUT_4, 5 h for explicit + implicit), scaled to all methods.
PRESETS = {
    "ptb": {
        "quick": PTBConfig(
            epochs=6, seeds=(0, 1), batch_size=10, lr=20.0, clip=0.25, weight_decay=1.2e-6,
            emsize=64, nhid=128, nlayers=2, bptt=20, train_tokens=10_000, valid_tokens=5_000,
            test_tokens=5_000, k_noise=4, methods=QUICK_METHODS,
            expected_time="about 8 min on 2 idle CPU cores, up to 15 min on a busy machine (measured)",
        ),
        # --preset cpu: sized so that regularization matters (without it, the model overfits 50k training
        # tokens after about 7 epochs, measured; 45k here) with only the methods the four claims need. Sized from
        # one measured epoch of every method at 100k tokens on 2 idle cores (training s per epoch, one
        # thread: none 38, dropout 37, DROPOUT_2 84, DROPOUT_4 145, DROPOUT_4+ξ 217, explicit 84,
        # explicit+implicit 131): about 330 core-s per epoch and seed at 45k tokens, plus ~10 s per
        # evaluation of valid + test.
        # Five seeds of the six methods the main claims rest on (CORE_METHODS), and at least three of the
        # others (the --resume runner trains them after); a sitting of one worker process costs about 270 CPU s
        # (dropout) to 1,400 CPU s (DROPOUT_4 + noise) of training per run plus ~300 s of evaluation (measured).
        "cpu": PTBConfig(
            epochs=20, seeds=(0, 1, 2, 3, 4), batch_size=20, lr=20.0, clip=0.25, weight_decay=1.2e-6,
            emsize=128, nhid=256, nlayers=2, bptt=35, train_tokens=45_000, eval_batch_size=64, k_values=(2, 4),
            k_noise=4,
            methods=("none", "dropout", "dropout_k2", "dropout_k4", "dropout_k4_noise", "dropout_k4_drop_noise",
                     "explicit", "explicit_scale2", "explicit_identity", "explicit_implicit"),
            expected_time="about 11 CPU hours for all methods and seeds (estimated from measured runs), resumable",
        ),
        "full": PTBConfig(
            epochs=50, seeds=(0, 1), batch_size=20, lr=30.0, clip=0.25, weight_decay=1.2e-6,
            emsize=400, nhid=1150, nlayers=3, bptt=70, k_noise=8,
            expected_time="ESTIMATE, not measured: roughly 15-30 GPU hours per seed (1-2.5 days for both seeds)",
        ),
    },
    "fmnist": {
        "quick": FMNISTConfig(
            epochs=60, seeds=(0, 1, 2, 3, 4), batch_size=50, lr=0.02, momentum=0.9, clip=None, hidden=256, layers=2,
            train_images=1000, valid_images=2000, k_noise=4, methods=QUICK_METHODS,
            expected_time="about 7 min on 2 idle CPU cores, up to 15 min on a busy machine (measured)",
        ),
        "full": FMNISTConfig(
            epochs=200, seeds=(0, 1, 2, 3, 4), batch_size=50, lr=0.02, momentum=0.9, clip=None, hidden=1024,
            layers=2, train_images=2000, valid_images=5000, k_noise=8,
            expected_time="ESTIMATE, not measured: about 1 hour on one GPU",
        ),
    },
}


def build_task(dataset: str, config: Config, device: str, data_dir: Optional[str] = None):
    """The task of ``dataset`` ("ptb" or "fmnist") with its data on ``device``, backend "auto"
    (C++ kernels for CPU tensors, CUDA kernels for GPU tensors). Module-level, so that worker
    processes can rebuild the task from a pickled ``functools.partial`` of it."""
    dr.set_backend("auto")
    if dataset == "ptb":
        return PTBTask(config, torch.device(device))
    return FMNISTTask(config, torch.device(device), data_dir)


class PTBTask:
    """Word-level Penn Treebank with an :class:`~repro.models.LSTMLanguageModel`; metric:
    perplexity exp(mean cross-entropy per token), lower is better.

    Training is truncated backpropagation through time over ``batch_size`` contiguous streams in
    windows of ``bptt`` tokens; the final state of a window (of the last forward the method ran) starts
    the next one. Evaluation runs the same way with ``eval_batch_size`` streams and dropout off.
    """

    name = "ptb"
    metric = "perplexity"
    higher_is_better = False

    def __init__(self, config: PTBConfig, device: torch.device, corpus: Optional[data.Corpus] = None) -> None:
        self.config = config
        self.device = device
        corpus = corpus or data.load_ptb()
        self.vocab_size = len(corpus.vocab)
        limits = {"train": config.train_tokens, "valid": config.valid_tokens, "test": config.test_tokens}
        sizes = {"train": config.batch_size, "valid": config.eval_batch_size, "test": config.eval_batch_size}
        self.streams = {
            split: data.batchify(corpus.splits[split][: limits[split]], sizes[split]).to(device) for split in limits
        }
        self.tokens = {split: stream.numel() for split, stream in self.streams.items()}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil((self.streams["train"].shape[0] - 1) / self.config.bptt)

    def build_model(self) -> nn.Module:
        c = self.config
        return models.LSTMLanguageModel(self.vocab_size, c.emsize, c.nhid, c.nlayers, c.q).to(self.device)

    def train_batches(self, model: nn.Module, epoch: int, seed: int) -> Iterator[tuple]:
        """((tokens, state), target) per window; the state is read after the previous step ran."""
        model.last_state = None
        for x, y in data.bptt_batches(self.streams["train"], self.config.bptt):
            yield (x, model.last_state), y

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> tuple:
        """(mean cross-entropy per token, perplexity) on ``split`` with dropout off."""
        model.eval()
        model.last_state = None
        total, count = 0.0, 0
        for x, y in data.bptt_batches(self.streams[split], self.config.bptt):
            total += cross_entropy(model((x, model.last_state)), y).item() * y.numel()
            count += y.numel()
        model.train()
        loss = total / count
        return loss, math.exp(min(loss, 700.0))


class FMNISTTask:
    """Fashion-MNIST with an MLP trained on a small fixed subset (so that it overfits and
    regularization matters); metric: classification accuracy in %, higher is better.

    The subset and the validation images are drawn once from the 60k training images
    (``subset_seed``), disjoint; the test metric is on the 10k test images (or their first
    ``test_images``). Each epoch visits the subset in an order fixed by (seed, epoch), so every
    method sees the same batches.
    """

    name = "fmnist"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, config: FMNISTConfig, device: torch.device, data_dir: Optional[str] = None) -> None:
        self.config = config
        self.device = device
        images, labels = data.load_fmnist("train", data_dir)
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(config.subset_seed))
        train = order[: config.train_images]
        valid = order[config.train_images : config.train_images + config.valid_images]
        test_images, test_labels = data.load_fmnist("test", data_dir)
        test_images = test_images[: config.test_images]
        # Standardize every pixel by the training subset's overall mean and std (one scalar each).
        mean, std = images[train].mean(), images[train].std()
        self.splits = {
            "train": (((images[train] - mean) / std).to(device), labels[train].to(device)),
            "valid": (((images[valid] - mean) / std).to(device), labels[valid].to(device)),
            "test": (((test_images - mean) / std).to(device), test_labels[: config.test_images].to(device)),
        }

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.config.train_images / self.config.batch_size)

    def build_model(self) -> nn.Module:
        c = self.config
        return models.mlp(784, c.hidden, c.layers, 10, c.q).to(self.device)

    def train_batches(self, model: nn.Module, epoch: int, seed: int) -> Iterator[tuple]:
        images, labels = self.splits["train"]
        generator = torch.Generator().manual_seed(1_000_003 * seed + epoch)
        order = torch.randperm(images.shape[0], generator=generator).to(self.device)
        for start in range(0, images.shape[0], self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            yield images[index], labels[index]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> tuple:
        """(mean cross-entropy, accuracy in %) on ``split`` with dropout off."""
        model.eval()
        images, labels = self.splits[split]
        total, correct = 0.0, 0
        for start in range(0, images.shape[0], self.config.eval_batch_size):
            logits = model(images[start : start + self.config.eval_batch_size])
            target = labels[start : start + self.config.eval_batch_size]
            total += cross_entropy(logits, target).item() * target.numel()
            correct += (logits.argmax(-1) == target).sum().item()
        model.train()
        return total / images.shape[0], 100.0 * correct / images.shape[0]
