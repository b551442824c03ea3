"""The seed API's modules: :class:`~resu.modules.linear.RESULinear` and :class:`~resu.modules.mode.RESUMode`."""

from resu.modules.linear import RESULinear
from resu.modules.mode import RESUMode

__all__ = ["RESULinear", "RESUMode"]
