"""Triton kernels and their launchers (no autograd): installed as ``dropreg_ext.triton_kernels``.

Every launcher goes through ``torch.library.wrap_triton`` so that the ops registered with
``torch.library.triton_op`` in ``dropreg_ext.ops`` trace under ``torch.compile``. On a machine
without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``).
"""
