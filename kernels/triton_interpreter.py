"""Halo's Triton kernels on CPU tensors, through Triton's interpreter.

The `*_triton` functions given CPU tensors (the kernels' CPU tests) run the kernel function itself
through `triton.runtime.interpreter.InterpretedFunction`, whether or not TRITON_INTERPRET is set:
that environment variable only changes what `@triton.jit` returns at decoration time, and would
turn every kernel decorated later in the process (Inductor's included) into an interpreted one.
An InterpretedFunction cannot call `@triton.jit` functions, so `interpreted` runs the kernel in a
copy of its module's namespace where each of the module's own @triton.jit helpers is interpreted
too. (triton.language.standard's, such as tl.max, are not: the kernels use builtins there.)
"""

from __future__ import annotations

import functools
import types


def _in_scope(fn, scope: dict):
    """`fn` with `scope` as its globals."""
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


@functools.lru_cache(maxsize=None)
def interpreted(kernel_fn):
    """`kernel_fn`, the undecorated kernel function, run by the Triton interpreter (built once)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    scope = dict(kernel_fn.__globals__)
    for name, value in kernel_fn.__globals__.items():
        if isinstance(value, JITFunction) and value.fn.__module__ == kernel_fn.__module__:
            scope[name] = InterpretedFunction(_in_scope(value.fn, scope))
    return InterpretedFunction(_in_scope(kernel_fn, scope))
