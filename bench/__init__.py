"""Benchmarks of dropreg_ext: per-op dropout, cross-entropy with a sampled label and site penalty, and
end-to-end training steps with dropout and with the dropout regularizer.

Run ``python -m bench`` (see ``bench/__main__.py`` for the options); results land in
``bench/results/<device-tag>/`` and ``python -m bench.report`` renders ``bench/results/README.md``.

Layout: :mod:`bench.config` (presets), :mod:`bench.measure` (timing and peak memory), per-op cases
in :mod:`bench.dropout`, :mod:`bench.ce` and :mod:`bench.site_penalty`, :mod:`bench.train`
(training-step cases and variants), :mod:`bench.checks` (acceptance checks), :mod:`bench.output`
(tables, JSON/CSV), :mod:`bench.plots`, :mod:`bench.report`.
"""

import os

# The CPU peak-memory probe uses torch.profiler, whose kineto backend otherwise prints start/stop
# lines (and a GPU-count error on CPU-only machines) for every profile. Level 6 keeps it quiet;
# it must be set before torch is imported.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
# OpenMP threads that wait actively spin on a core after each parallel region. On a shared machine
# with more runnable threads than cores, the spinning worker takes the CPU share of the thread
# doing the work: a training step of many small ops (the LSTM) ran 10x slower and 3x noisier
# (2 cores, load average 8). Passive waiting sleeps instead; it applies to every provider alike
# and an OMP_WAIT_POLICY set by the caller wins. Read when torch loads OpenMP, so set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
