"""How Inductor sees halo's quantized matmuls on CUDA: decomposed into what it compiles itself.

A custom op stays an opaque call in Inductor's generated code: a call back into Python whose
body launches the Triton kernels through Triton's Python launcher and the GEMM through the
dispatcher. That host work (~0.7 ms per quantized matmul, measured: docs/BENCHMARKS.md) exceeded
the GPU time of the kernels it launched at Llama-3-8B shapes. So, while AOTAutograd traces the
forward and the registered backward, `halo::quantized_linear` and `halo::scaled_matmul` on CUDA
are replaced by the fused path's pieces:

* `halo::hadamard_quantize`, a `triton_op`: Inductor emits the Triton kernel into its output
  code and launches it with its own launcher;
* `halo::checked_scale`, the deferred inf/NaN check (an op call, only when checks are on);
* `aten._scaled_mm` / `aten._int_mm`: extern cuBLASLt calls;
* the scale, padding and outer-rotation arithmetic, as aten ops that Inductor fuses.

The ops stay whole (an opaque call, their body as before) where the fused kernel does not apply:
stochastic rounding, Hadamard blocks above 256, format "none", float64; and off CUDA, where the
reference is what runs.
"""

from __future__ import annotations

import torch

from .hadamard import sylvester_signs
from .quantized_linear import linear_forward
from .scaled_matmul import cuda_gemm, fused_block, fused_scaled_matmul
from .triton_hadamard_quantize import hadamard_quantize  # noqa: F401  (registers the op)


def _hadamard_quantize_op(x, fmt, granularity, block, dim):
    return torch.ops.halo.hadamard_quantize(x, fmt, granularity, block, dim)


def decompose_scaled_matmul(a, b, fmt, rotation, max_block, granularity, rounding_a,
                            rounding_b, check_finite_inputs, where):
    if a.device.type != "cuda":
        return NotImplemented
    block = fused_block(a, b, fmt, rotation, max_block, rounding_a, rounding_b)
    if block is None:
        return NotImplemented
    return fused_scaled_matmul(cuda_gemm, a, b, fmt, rotation, block, granularity,
                               check_finite_inputs, where,
                               quantize_operand=_hadamard_quantize_op, signs=sylvester_signs)


def decompose_quantized_linear(x, weight, bias, fmt, granularity, forward_rotation,
                               grad_input_rotation, grad_weight_rotation, max_block,
                               grad_rounding, check_finite, name):
    # Only the forward: the registered autograd formula still runs above this (it is what emits
    # the backward's two halo::scaled_matmul calls, decomposed in turn).
    if x.device.type != "cuda":
        return NotImplemented
    return linear_forward(x, weight, bias, fmt, granularity, forward_rotation, max_block,
                          check_finite, name)


def halo_decompositions() -> dict:
    """Entries to add to Inductor's decomposition table (`compile_fx(..., decompositions=)`)."""
    return {
        torch.ops.halo.scaled_matmul.default: decompose_scaled_matmul,
        torch.ops.halo.quantized_linear.default: decompose_quantized_linear,
    }
