"""`halo::quantized_linear`: `F.linear` whose three matmuls all run quantized.

The forward is one `halo::scaled_matmul`; the registered autograd formula computes grad-input
and grad-weight with two more, so AOTAutograd's backward graph holds quantized matmuls rather
than a high-precision fallback. Each matmul has its own rotation placement (see
scaled_matmul.py). Outputs are in the activation's dtype; the weight gradient in the weight's.

With `cache_weight` (option `cache_weights`; `weight` must then be the parameter itself, whose
identity and version counter the cache keys on) the forward and grad-input matmuls take the
weight side from the weight cache, as a frozen weight's do (`halo::frozen_weight_matmul`): the
weight is rotated and quantized once per version, i.e. once per optimizer step however many
micro-batches accumulate gradients in between. Same values as without the cache.
"""

from __future__ import annotations

from typing import Optional

import torch

from .frozen_linear import frozen_linear_forward
from .hadamard import pad_rows
from .quantize import HOST_SIDE_TAGS
from .scaled_matmul import padded_rows, scaled_matmul  # noqa: F401  (registers the op)
from .settings import LinearSettings, WeightSource
from .shared_operands import DY_TRANSPOSE, shared, shared_view

_PARAMETER = WeightSource()  # the cached-weight ops read the parameter as it is, W [out, in]


def linear_forward(x, weight, bias, settings: LinearSettings):
    if settings.cache_weight:
        return frozen_linear_forward(x, weight, [], bias, _PARAMETER, settings)
    x2d = shared_view(x, "tokens x features", lambda t: t.reshape(-1, t.shape[-1]))
    y = torch.ops.halo.scaled_matmul(x2d, weight.to(x.dtype), settings.forward.encoded)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("halo::quantized_linear", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     settings: str) -> torch.Tensor:
    """y = x @ weightᵀ + bias, as the encoded LinearSettings `settings` say: the forward as
    `halo::scaled_matmul` with their forward rotation (`fast_accum` applies to it only: the
    gradients accumulate in float32); `cache_weight`: the weight side from the weight cache
    (see the module docstring)."""
    return linear_forward(x, weight, bias, LinearSettings.decode(settings))


@quantized_linear.register_fake
def _(x, weight, bias, settings):
    name = LinearSettings.decode(settings).name
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"{name}: x and weight do not match")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, settings = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.settings = LinearSettings.decode(settings)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    settings = ctx.settings
    gi_rot, gw_rot = settings.grad_input_rotation, settings.grad_weight_rotation
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_w = grad_b = None
    # grad-weight "inner" rotates along the tokens: they are zero-padded to a multiple of the
    # block (zeros add nothing to dYᵀ X), as an "outer" grad-input pads them.
    pad = settings.grad_weight.max_block if gw_rot == "inner" else 1
    dy_gw = padded_rows(dy, pad) if gw_rot == "inner" else dy
    dyt = shared_view(dy_gw, "features x tokens", lambda t: t.t())
    if gi_rot == "outer" and gw_rot == "inner" and all(ctx.needs_input_grad[:2]):
        # grad-input rotates dY along the tokens, grad-weight dYᵀ along the same tokens by the
        # same block: the compiled path quantizes both in one kernel when told so
        # (inductor_decompositions.py).
        shared(dy_gw, DY_TRANSPOSE, lambda _: True)
    if ctx.needs_input_grad[0] and settings.cache_weight:
        # dX = dY W: contraction over out-features, W [out, in] the cached weight's transpose.
        grad_x = torch.ops.halo.frozen_weight_matmul(
            dy, weight, [], _PARAMETER.transposed.encoded, settings.grad_input.encoded,
        ).reshape(x.shape)
    elif ctx.needs_input_grad[0]:
        # dX = dY W: contraction over out-features.
        grad_x = torch.ops.halo.scaled_matmul(
            dy, weight.to(dy.dtype).t(), settings.grad_input.encoded).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        # dW = dYᵀ X: contraction over tokens. Its operands need no inf/NaN check of their own
        # when grad-input checked dY and the forward checked X: each check costs host time.
        xt = shared_view(x, ("features x tokens", dy.dtype, pad),
                         lambda t: pad_rows(t.reshape(-1, t.shape[-1]).to(dy.dtype), pad).t())
        grad_weight = settings.grad_weight if grad_x is None else settings.grad_weight.unchecked
        grad_w = torch.ops.halo.scaled_matmul(dyt, xt, grad_weight.encoded).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = dy.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None


quantized_linear.register_autograd(_backward, setup_context=_setup_context)
