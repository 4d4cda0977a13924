"""Kernel launching shared by the launchers, and what makes it work on every supported Triton.

Launches go through ``torch.library.wrap_triton`` when torch has it and the kernel is compiled, so
the launch is traceable by ``torch.compile``; the bare kernel otherwise. Under
``TRITON_INTERPRET=1`` ``@triton.jit`` gives an interpreted function, which only runs eagerly:
torch 2.14 hands such a kernel back unwrapped, torch 2.11 raises ("wrap_triton only works on
functions annotated with triton.jit"), so it is never passed to ``wrap_triton`` here.
"""

import struct

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.jit import JITFunction

_wrap = getattr(torch.library, "wrap_triton", None)


def kernel_launcher(kernel):
    """The launcher of a kernel (``launcher[grid](...)``), built once per kernel where it is defined."""
    return _wrap(kernel) if _wrap is not None and isinstance(kernel, JITFunction) else kernel


def float_bits(value: float, dtype: torch.dtype) -> int:
    """The bits of ``value`` rounded to ``dtype`` (float64, else float32: round to nearest even), as a
    Python int: a float argument of a kernel passed as a scalar, with no tensor made per call and
    exact for float64 (:func:`float_from_bits` reads it back). ``value`` lies in float32's range."""
    if dtype == torch.float64:
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return struct.unpack("<i", struct.pack("<f", value))[0]


@triton.jit
def float_from_bits(bits, FLOAT64: tl.constexpr):
    """The float64 (else float32) whose bits :func:`float_bits` passed. tl.cast, not .to:
    torch.compile lowers a kernel with its scalar arguments as Python constants, which have no
    methods and take the narrowest integer type that holds them."""
    if FLOAT64:
        return tl.cast(tl.cast(bits, tl.int64), tl.float64, bitcast=True)
    else:
        return tl.cast(tl.cast(bits, tl.uint32), tl.float32, bitcast=True)


def reduction_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is contiguous at a 16-byte aligned address, else a contiguous copy.

    Triton specializes a kernel on whether each pointer is 16-byte aligned and each integer
    argument divisible by 16, and the compiled layout, and with it the order of a ``tl.sum``,
    follows. A kernel that reduces must see the same specialization for a view as for its
    contiguous copy (then the strides and sizes are functions of the shape alone), or the two could
    sum in different orders and give different bits. The caching allocator's blocks are aligned,
    so a copy is only made for views that are strided or start inside a block at an odd offset.

    While torch.compile traces the launcher (``triton_op``), ``t`` is a fake tensor without an
    address: there the storage offset decides, which is the address test for allocator blocks.
    """
    if is_fake(t):
        aligned = t.storage_offset() * t.element_size() % 16 == 0
    else:
        aligned = t.data_ptr() % 16 == 0
    if t.is_contiguous() and aligned:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array)``, but its
    scalars are 1-element arrays of shape (1,), which NumPy >= 2.4 refuses to convert: every
    ``range()`` with a runtime bound then fails ("only 0-dimensional arrays can be converted").
    Triton 3.7 converts with ``int(data.squeeze())``; this gives older interpreters the same rule.
    Compiled kernels are unaffected."""
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    if (major, minor) != (3, 6):  # the oldest supported Triton; 3.7 has the fix
        return
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


_interpreter_index_fix()
