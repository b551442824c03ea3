"""A dispatch table from aten overloads to handlers, filled with an ``implements`` decorator.

Each tensor subclass owns one table, so its ``__torch_dispatch__`` is a lookup rather than an
if/elif chain, and the set of ops a subclass handles natively is readable in one place.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class OpTable:
    """Maps ``torch._ops.OpOverload`` (or an ``OpOverloadPacket``, meaning every overload) to handlers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._handlers: dict[object, Callable] = {}

    def implements(self, ops: object | Iterable[object]) -> Callable[[Callable], Callable]:
        """Register the decorated function as the handler of ``ops``.

        The handler is called as ``handler(func, args, kwargs)``.
        """
        op_list = list(ops) if isinstance(ops, (list, tuple, set)) else [ops]

        def decorator(fn: Callable) -> Callable:
            for op in op_list:
                self._handlers[op] = fn
            return fn

        return decorator

    def lookup(self, func: torch._ops.OpOverload) -> Callable | None:
        handler = self._handlers.get(func)
        if handler is None:
            handler = self._handlers.get(func.overloadpacket)
        return handler

    def __contains__(self, func: object) -> bool:
        return func in self._handlers
