"""Loading of the compiled extension (xformers-style graceful import).

``import dropreg_ext`` never fails because ``dropreg_ext._C`` is missing or was built for another
torch: it warns once with what to do, and the ops fall back to the pure-PyTorch reference.
"""

from __future__ import annotations

import json
import warnings

import torch

_REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` (or `make build`) in the source tree"


def _load():
    try:
        from . import _C  # noqa: F401  (loading it registers the dropreg:: ops)
    except (ImportError, OSError) as exc:
        warnings.warn(
            f"dropreg_ext: the compiled extension dropreg_ext._C could not be loaded ({exc}); "
            f"falling back to the pure-PyTorch reference kernels (slow). To fix it, {_REBUILD_HINT} "
            f"against the installed torch {torch.__version__}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, {}
    info = json.loads(_C.build_info())
    if info.get("torch") != torch.__version__:
        warnings.warn(
            f"dropreg_ext: the compiled extension was built against torch {info.get('torch')} but torch "
            f"{torch.__version__} is installed; falling back to the pure-PyTorch reference kernels. "
            f"To fix it, {_REBUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, info
    return _C, info


C, BUILD_INFO = _load()
HAS_CPU = C is not None
HAS_CUDA = HAS_CPU and "cuda" in BUILD_INFO.get("backends", [])

try:
    import triton  # noqa: F401

    from . import triton_kernels  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
