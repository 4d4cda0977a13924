"""Benchmarks of dropreg_ext: per-op dropout and end-to-end training steps.

Run ``python -m bench`` (see ``bench/__main__.py`` for the options); results land in
``bench/results/<device-tag>/`` and ``python -m bench.report`` renders ``bench/results/README.md``.

Layout: :mod:`bench.config` (presets), :mod:`bench.measure` (timing and peak memory),
:mod:`bench.dropout` (per-op cases), :mod:`bench.train` (training-step cases),
:mod:`bench.output` (table, JSON/CSV, acceptance checks), :mod:`bench.plots`, :mod:`bench.report`.
"""

import os

# The CPU peak-memory probe uses torch.profiler, whose kineto backend otherwise prints start/stop
# lines (and a GPU-count error on CPU-only machines) for every profile. Level 6 keeps it quiet;
# it must be set before torch is imported.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
