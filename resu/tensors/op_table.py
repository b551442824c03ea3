"""Dispatch tables filled with an ``implements`` decorator, one per entry kind of a tensor subclass.

A subclass owns one table for ``__torch_dispatch__`` (aten overloads) and, if it needs one, one for
``__torch_function__`` (Python-level functions such as ``F.linear``): each entry point is a lookup
rather than an if/elif chain, and the ops a subclass handles natively are readable in one place.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional


class OpTable:
    """Maps ops to handlers called as ``handler(func, args, kwargs)``.

    Keys are ``torch._ops.OpOverload`` (or an ``OpOverloadPacket``, meaning every overload) for a
    dispatch table, and plain callables for a torch-function table. Ops without a handler go to
    the table's fallback (set with :meth:`fallback`).
    """

    def __init__(self) -> None:
        self._handlers: dict[object, Callable] = {}
        self._fallback: Optional[Callable] = None

    def implements(self, ops: object | Iterable[object]) -> Callable[[Callable], Callable]:
        """Register the decorated function as the handler of ``ops`` (one op or a list of them)."""
        op_list = list(ops) if isinstance(ops, (list, tuple, set)) else [ops]

        def decorator(fn: Callable) -> Callable:
            for op in op_list:
                self._handlers[op] = fn
            return fn

        return decorator

    def fallback(self, fn: Callable) -> Callable:
        """Register the decorated function as the handler of every op without one."""
        self._fallback = fn
        return fn

    def lookup(self, func) -> Callable:
        """The handler of ``func``: its own, its overload packet's, else the fallback."""
        handler = self._handlers.get(func)
        if handler is None:
            packet = getattr(func, "overloadpacket", None)
            handler = self._handlers.get(packet) if packet is not None else None
        return handler if handler is not None else self._fallback
