"""Halo's Triton kernels on CPU tensors, through Triton's interpreter.

The `*_triton` functions given CPU tensors (the kernels' CPU tests) run the kernel function itself
through `triton.runtime.interpreter.InterpretedFunction`, whether or not TRITON_INTERPRET is set:
that environment variable only changes what `@triton.jit` returns at decoration time, and would
turn every kernel decorated later in the process (Inductor's included) into an interpreted one.
An InterpretedFunction cannot call `@triton.jit` functions, so `interpreted` runs the kernel in a
copy of its module's namespace where each @triton.jit helper it names is interpreted too, in a
copy of its own module's namespace, and so on for the helpers those call. (Only names of the
modules' namespaces: triton.language.standard's, such as tl.max, reached as attributes, are not
interpreted; the kernels use builtins there.)
"""

from __future__ import annotations

import functools
import types


def _in_scope(fn, scope: dict):
    """`fn` with `scope` as its globals."""
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _interpreted_scope(namespace: dict, scopes: dict) -> dict:
    """A copy of a module's `namespace` in which its @triton.jit functions are interpreted, each
    in the interpreted scope of its own module (`scopes`: those built so far, by id)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    scope = scopes.get(id(namespace))
    if scope is None:
        scope = scopes[id(namespace)] = dict(namespace)
        for name, value in namespace.items():
            if isinstance(value, JITFunction) and not value.fn.__module__.startswith("triton."):
                helper_scope = _interpreted_scope(value.fn.__globals__, scopes)
                scope[name] = InterpretedFunction(_in_scope(value.fn, helper_scope))
    return scope


@functools.lru_cache(maxsize=None)
def interpreted(kernel_fn):
    """`kernel_fn`, the undecorated kernel function, run by the Triton interpreter (built once)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_in_scope(kernel_fn, _interpreted_scope(kernel_fn.__globals__, {})))
