"""Kernel launching shared by the launchers: through ``torch.library.wrap_triton`` when torch has
it, so the launch is traceable by ``torch.compile``; the bare kernel otherwise (older torch)."""

import torch

_wrap = getattr(torch.library, "wrap_triton", None)


def kernel_launcher(kernel):
    return _wrap(kernel) if _wrap is not None else kernel
