"""How Inductor sees halo's quantized matmuls on CUDA: decomposed into what it compiles itself.

A custom op stays an opaque call in Inductor's generated code: a call back into Python whose
body launches the Triton kernels through Triton's Python launcher and the GEMM through the
dispatcher. That host work (~0.7 ms per quantized matmul, measured on an H200) exceeded
the GPU time of the kernels it launched at Llama-3-8B shapes. So, while AOTAutograd
functionalizes the forward and the registered backward (the same hook through which a
`triton_op` is decomposed: a FunctionalTensorMode rule, so that the nested triton_op is traced
into its kernel in turn), `halo::quantized_linear` and `halo::scaled_matmul` on CUDA
(and their frozen-weight versions, `halo::frozen_linear` and `halo::frozen_weight_matmul`) are
replaced by the fused path's pieces:

* `halo::hadamard_quantize`, a `triton_op`: Inductor emits the Triton kernel into its output
  code and launches it with its own launcher;
* `halo::checked_scale`, the deferred inf/NaN check (an op call, only when checks are on);
* `aten._scaled_mm` (an extern cuBLASLt call) / `halo::int8_scaled_mm` (a triton_op: the INT8
  GEMM with the scales in its epilogue, emitted by Inductor);
* for a cached weight (frozen, or trained under `cache_weights`), instead of the weight's
  quantization: `halo::cached_quantized_weight`, which returns the weight cache's tensors
  (frozen_linear.py; the backend keeps Inductor from reusing their buffers);
* the scale, padding and outer-rotation arithmetic, as aten ops that Inductor fuses.

The ops stay whole (an opaque call, their body as before) where the fused kernel does not apply:
Hadamard blocks above 256, format "none", float64; off CUDA, where the
reference is what runs; for tensor subclasses; and under torch.export. (aot_eager functionalizes
too, so it runs the same pieces, eagerly.)
"""

from __future__ import annotations

import torch

from .frozen_linear import (
    frozen_linear,
    frozen_linear_forward,
    frozen_weight_matmul,
    fused_frozen_weight_matmul,
)
from .hadamard import sylvester_signs
from .quantized_linear import linear_forward, quantized_linear
from .scaled_matmul import cuda_gemm, fused_block, fused_scaled_matmul, gemm_with, scaled_matmul
from .settings import LinearSettings, MatmulSettings, WeightSource
from .shared_operands import DY_TRANSPOSE, cached, shared, shared_view
from .triton_hadamard_quantize import (  # noqa: F401  (registers the ops)
    hadamard_quantize,
    hadamard_quantize_dual,
)


def _hadamard_quantize_op(x, fmt, granularity, block, dim, rounding):
    # Once per operand object: linears reading one activation share it (shared_operands.py).
    if dim == 0 and block and granularity == "row" and cached(x, DY_TRANSPOSE):
        # grad-input's dY ("outer": rotated along the tokens), whose transpose grad-weight
        # rotates along the same tokens next (quantized_linear.py). One kernel quantizes both,
        # and leaves dYᵀ's where grad-weight's view of dY looks for it.
        q, scale, qt, scale_t = shared(
            x, ("hadamard_quantize_dual", fmt, block, rounding),
            lambda t: torch.ops.halo.hadamard_quantize_dual(t, fmt, block, rounding))
        dyt = shared_view(x, "features x tokens", lambda t: t.t())
        shared(dyt, ("hadamard_quantize", fmt, granularity, block, 1, rounding),
               lambda _: (qt, scale_t))
        return q, scale
    return shared(x, ("hadamard_quantize", fmt, granularity, block, dim, rounding),
                  lambda t: torch.ops.halo.hadamard_quantize(t, fmt, granularity, block, dim,
                                                             rounding))


TRACEABLE_KERNELS = {"quantize_operand": _hadamard_quantize_op, "signs": sylvester_signs}
"""What the fused path runs when traced: the kernel as its triton_op, the ±1 block as ops."""


def fused_device(t: torch.Tensor) -> bool:
    """Where the ops decompose: CUDA (elsewhere the op's reference body is what runs)."""
    return t.device.type == "cuda"


def decompose_scaled_matmul(a, b, settings):
    if not fused_device(a):
        return NotImplemented
    settings = MatmulSettings.decode(settings)
    block = fused_block(a, b, settings)
    if block is None:
        return NotImplemented
    return fused_scaled_matmul(gemm_with(cuda_gemm, settings.fast_accum), a, b, settings, block,
                               **TRACEABLE_KERNELS)


def decompose_quantized_linear(x, weight, bias, settings):
    # Only the forward: the registered autograd formula still runs above this (it is what emits
    # the backward's two halo::scaled_matmul calls, decomposed in turn).
    if not fused_device(x):
        return NotImplemented
    return linear_forward(x, weight, bias, LinearSettings.decode(settings))


def decompose_frozen_weight_matmul(a, weight, fold_inputs, source, settings):
    if not fused_device(a):
        return NotImplemented
    settings = MatmulSettings.decode(settings)
    block = fused_block(a, weight, settings)
    if block is None:
        return NotImplemented
    return fused_frozen_weight_matmul(a, weight, fold_inputs, WeightSource.decode(source),
                                      settings, block, **TRACEABLE_KERNELS)


def decompose_frozen_linear(x, weight, fold_inputs, bias, source, settings):
    if not fused_device(x):
        return NotImplemented
    return frozen_linear_forward(x, weight, fold_inputs, bias, WeightSource.decode(source),
                                 LinearSettings.decode(settings))


DECOMPOSITIONS = {
    scaled_matmul: decompose_scaled_matmul,
    quantized_linear: decompose_quantized_linear,
    frozen_weight_matmul: decompose_frozen_weight_matmul,
    frozen_linear: decompose_frozen_linear,
}
"""Each op's decomposition (returning NotImplemented where the op stays whole)."""


def _decomposition_disabled() -> bool:
    """torch.export keeps custom ops whole (as it keeps triton_ops): so do we."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # a torch without the switch
        return False
    return custom_triton_ops_decomposition_disabled()


def _register(op, decomposition) -> None:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def plain(t):  # tensor subclasses (DTensor, ...) get the op whole, as triton_op does
        return t in (torch.Tensor, FunctionalTensor) or issubclass(t, FakeTensor)

    def rule(mode, func, types, args, kwargs):
        if _decomposition_disabled() or not all(plain(t) for t in types):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:
            out = decomposition(*args, **kwargs)
        if out is NotImplemented:
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return out

    op.register_torch_dispatch(FunctionalTensorMode, rule)


for _op, _decomposition in DECOMPOSITIONS.items():
    _register(_op, _decomposition)
