"""Functional forms, mirroring ``torch.nn.functional`` (thin aliases of :mod:`dropreg_ext.ops`)."""

from .ops import dropout

__all__ = ["dropout"]
