"""`halo::emulated_quantized_linear`: 4-bit weight/activation quantization for inference, emulated.

Formats (symmetric integers, round to nearest, QuaRot's RTN baseline):
    "int4"  W4A4: weights per output channel, activations per token, both 4-bit (±7)
    "w4a8"  W4A8: 4-bit weights per output channel, 8-bit activations per token (±127)
The quantized values are dequantized and multiplied in float32: the plain-torch reference, on
any device. No GPU has a 4-bit GEMM path here, so the report marks these layers "emulated".
The backward is a straight-through estimator (high-precision matmuls), for completeness: these
formats are meant for inference with rotate="fused".
"""

from __future__ import annotations

from typing import Optional

import torch

from .constants import EMULATED_FORMATS, MIN_AMAX
from .hadamard import block_hadamard, hadamard_block_size
from .quantize import HOST_SIDE_TAGS, absmax, check_finite
from .settings import LinearSettings


def fake_quantize_rows(t: torch.Tensor, bits: int, check: bool, where: str) -> torch.Tensor:
    """Symmetric round-to-nearest to `bits` with one scale per row, returned dequantized
    (float32; float64 stays float64)."""
    amax = absmax(t, "row")
    if check:
        check_finite(amax, where)
    levels = 2 ** (bits - 1) - 1
    scale = amax.clamp_min(MIN_AMAX).to(t.dtype if t.dtype == torch.float64 else torch.float32)
    scale = scale / levels
    return torch.round(t / scale).clamp(-levels, levels) * scale


def emulated_quantized_linear_reference(x, weight, bias, settings: LinearSettings):
    """y = Q_a(x H) Q_w(W H)ᵀ + bias, H a block Hadamard along in-features when
    `settings.forward_rotation` is "inner" (else none), the 4-bit format `settings.format`."""
    if settings.format not in EMULATED_FORMATS:
        raise ValueError(f"halo::emulated_quantized_linear ({settings.name}) takes the formats "
                         f"{tuple(EMULATED_FORMATS)}, got {settings.format!r}")
    weight_bits, act_bits = EMULATED_FORMATS[settings.format]
    check, name, max_block = settings.check_finite, settings.name, settings.max_block
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2d, w = x.reshape(-1, x.shape[-1]).to(compute_dtype), weight.to(compute_dtype)
    inner = settings.forward_rotation == "inner"
    block = hadamard_block_size(w.shape[1], max_block) if inner else 0
    if block:
        x2d, w = block_hadamard(x2d, block, dim=1), block_hadamard(w, block, dim=1)
    y = (fake_quantize_rows(x2d, act_bits, check, f"{name} forward (activation)")
         @ fake_quantize_rows(w, weight_bits, check, f"{name} forward (weight)").t())
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("halo::emulated_quantized_linear", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def emulated_quantized_linear(x: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], settings: str) -> torch.Tensor:
    """The reference above; `settings`: the encoded LinearSettings (their format, forward
    rotation, block limit, check and name; the gradients are high-precision)."""
    return emulated_quantized_linear_reference(x, weight, bias, LinearSettings.decode(settings))


@emulated_quantized_linear.register_fake
def _(x, weight, bias, settings):
    name = LinearSettings.decode(settings).name
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"{name}: x and weight do not match")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    """Straight-through: the gradients of the unquantized linear."""
    x, weight = ctx.saved_tensors
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = (dy @ weight.to(dy.dtype)).reshape(x.shape) if ctx.needs_input_grad[0] else None
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = (dy.t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(weight.dtype)
    grad_b = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = dy.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None


emulated_quantized_linear.register_autograd(_backward, setup_context=_setup_context)
