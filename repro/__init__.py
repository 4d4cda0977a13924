"""Reproduction of Wei, Kakade & Ma (ICML 2020), "The Implicit and Explicit Regularization Effects of
Dropout", on real data with ``dropreg_ext``.

For one model and one set of seeds, with the same hyperparameters for every method, it trains:
no regularization; dropout (DROPOUT_1); DROPOUT_k for k in {2, 4, 8}; the explicit regularizer alone
(sampled label, R_approx, and true label, R̃); explicit + implicit (R_approx + ξ_approx); and
DROPOUT_k + √(1−1/k)·ξ_approx for one k. Datasets: word-level Penn Treebank with an LSTM language
model (the paper's setting) and Fashion-MNIST with an MLP on a small training subset.

    python -m repro ptb --quick        # <= 15 min on 2 CPU cores
    python -m repro fmnist --quick     # <= 15 min on 2 CPU cores
    python -m repro all --full         # paper-scale sizes, for a GPU
    python -m repro report             # README.md, results.md, curves.png from the JSON files

Modules: :mod:`.data` (loaders), :mod:`.models` (double-backward LSTM, MLP), :mod:`.methods` (the
objectives), :mod:`.tasks` (datasets, presets, evaluation), :mod:`.train` (training loop and runner),
:mod:`.report` (tables, claim checks, plots).
"""
