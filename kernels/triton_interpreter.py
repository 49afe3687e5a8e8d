"""Halo's Triton kernels on CPU tensors, through Triton's interpreter.

The `*_triton` functions given CPU tensors (the kernels' CPU tests) run the kernel function itself
through `triton.runtime.interpreter.InterpretedFunction`, whether or not TRITON_INTERPRET is set:
that environment variable only changes what `@triton.jit` returns at decoration time, and would
turn every kernel decorated later in the process (Inductor's included) into an interpreted one.
An InterpretedFunction cannot call `@triton.jit` functions, so `interpreted` runs the kernel in a
copy of its module's namespace where each of the module's own @triton.jit helpers is interpreted
too. (triton.language.standard's, such as tl.max, are not: the kernels use builtins there.)
The random numbers of stochastic rounding come from `tl.randint` (Philox, as Inductor's own
random ops), a @triton.jit function of triton.language.random: during an interpreted launch
`tl.randint` is an interpreted copy of it (restored after), so the CPU tests run the same
generator as the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import types


def _in_scope(fn, scope: dict):
    """`fn` with `scope` as its globals."""
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _with_interpreted_helpers(namespace: dict, module_name: str) -> dict:
    """A copy of a module's namespace in which its own @triton.jit functions are interpreted
    (calling each other through the copy)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    scope = dict(namespace)
    for name, value in namespace.items():
        if isinstance(value, JITFunction) and value.fn.__module__ == module_name:
            scope[name] = InterpretedFunction(_in_scope(value.fn, scope))
    return scope


@contextlib.contextmanager
def _interpreted_randint():
    import triton.language as tl
    import triton.language.random as random

    scope = _random_scope(random)
    saved = tl.randint
    tl.randint = scope["randint"]
    try:
        yield
    finally:
        tl.randint = saved


@functools.lru_cache(maxsize=None)
def _random_scope(random_module) -> dict:
    return _with_interpreted_helpers(vars(random_module), random_module.__name__)


class _Launcher:
    """An interpreted kernel, launched as `kernel[grid](...)` is."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _interpreted_randint():
                return self.fn[grid](*args, **kwargs)
        return launch


@functools.lru_cache(maxsize=None)
def interpreted(kernel_fn):
    """`kernel_fn`, the undecorated kernel function, run by the Triton interpreter (built once)."""
    from triton.runtime.interpreter import InterpretedFunction

    scope = _with_interpreted_helpers(kernel_fn.__globals__, kernel_fn.__module__)
    return _Launcher(InterpretedFunction(_in_scope(kernel_fn, scope)))
