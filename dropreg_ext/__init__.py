"""dropreg_ext: fused dropout and the explicit/implicit regularizers that explain it.

    >>> import dropreg_ext as dr
    >>> dr.replace_dropout(model)                 # fused, mask-free, bit-reproducible dropout
    >>> dr.set_backend("triton")                  # or "auto" | "cuda" | "cpu" | "reference"
"""

from . import _ext, backends, functional, lstm, nn, ops, patching, reference, regularizer
from .backends import get_backend, set_backend, use_backend
from .lstm import LSTM  # noqa: F401  (exported through *lstm.__all__ below)
from .nn import (  # noqa: F401  (exported through *nn.__all__ below)
    AlphaDropout,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    FeatureAlphaDropout,
    LockedDropout,
    Site,
    record_sites,
    replace_dropout,
)
from .patching import functional_patched, patch_functional  # noqa: F401  (through *patching.__all__)
from .regularizer import DropoutRegularizer, k_sample_loss  # noqa: F401  (through *regularizer.__all__)

__version__ = "0.1.0"

__all__ = [
    *nn.__all__,
    *lstm.__all__,
    *regularizer.__all__,
    *patching.__all__,
    "functional",
    "ops",
    "backends",
    "nn",
    "lstm",
    "patching",
    "regularizer",
    "reference",
    "set_backend",
    "get_backend",
    "use_backend",
    "build_info",
]


def build_info() -> dict:
    """Facts about this install: versions the extension was built against and usable backends."""
    import torch

    return {
        "dropreg_ext": __version__,
        "torch_installed": torch.__version__,
        "extension_loaded": _ext.HAS_CPU,
        "built_against": _ext.BUILD_INFO,
        "cpu_dropout_path": _ext.C.cpu_capability() if _ext.HAS_CPU else None,
        "triton": _ext.HAS_TRITON,
        "cuda_device": torch.cuda.is_available(),
        "backend": get_backend(),
    }
