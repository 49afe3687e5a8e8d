"""Halo's Triton kernels on CPU tensors, through Triton's interpreter.

The `*_triton` functions given CPU tensors (the kernels' CPU tests) run the kernel function itself
through `triton.runtime.interpreter.InterpretedFunction`, whether or not TRITON_INTERPRET is set:
that environment variable only changes what `@triton.jit` returns at decoration time, and would
turn every kernel decorated later in the process (Inductor's included) into an interpreted one.
An InterpretedFunction cannot call `@triton.jit` functions (tl.max, tl.zeros & co. of
triton.language.standard among them), so the kernels use builtins only.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def interpreted(kernel_fn):
    """`kernel_fn`, the undecorated kernel function, run by the Triton interpreter (built once)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel_fn)
