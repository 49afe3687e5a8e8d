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
from .quantize import HOST_SIDE_TAGS
from .hadamard import pad_rows, token_block
from .scaled_matmul import padded_rows, scaled_matmul  # noqa: F401  (registers the op)
from .shared_operands import DY_TRANSPOSE, shared, shared_view


def linear_forward(x, weight, bias, fmt, granularity, forward_rotation, max_block, check_finite,
                   name, fast_accum, cache_weight=False):
    if cache_weight:
        return frozen_linear_forward(x, weight, "", [], bias, False, fmt, granularity,
                                     forward_rotation, max_block, check_finite, name, fast_accum)
    x2d = shared_view(x, "tokens x features", lambda t: t.reshape(-1, t.shape[-1]))
    y = torch.ops.halo.scaled_matmul(
        x2d, weight.to(x.dtype), fmt, forward_rotation, max_block, granularity,
        "nearest", "nearest", check_finite, f"{name} forward", fast_accum,
    )
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("halo::quantized_linear", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    granularity: str,
    forward_rotation: str,
    grad_input_rotation: str,
    grad_weight_rotation: str,
    max_block: int,
    grad_rounding: str,
    check_finite: bool,
    name: str,
    fast_accum: bool,
    cache_weight: bool = False,
) -> torch.Tensor:
    """y = x @ weightᵀ + bias, computed as `halo::scaled_matmul` with `forward_rotation`;
    `fast_accum` applies to the forward GEMM only (the gradients accumulate in float32);
    `cache_weight`: the weight side from the weight cache (see the module docstring)."""
    return linear_forward(x, weight, bias, fmt, granularity, forward_rotation, max_block,
                          check_finite, name, fast_accum, cache_weight)


@quantized_linear.register_fake
def _(x, weight, bias, fmt, granularity, forward_rotation, grad_input_rotation,
      grad_weight_rotation, max_block, grad_rounding, check_finite, name, fast_accum,
      cache_weight=False):
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"{name}: x and weight do not match")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, fmt, granularity, _, gi_rot, gw_rot, max_block, rounding, check, name, _,
     cache_weight) = inputs  # (defaults filled in)
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.settings = (fmt, granularity, gi_rot, gw_rot, max_block, rounding, check, name,
                    cache_weight)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    fmt, granularity, gi_rot, gw_rot, max_block, rounding, check, name, cache_weight = (
        ctx.settings)
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_w = grad_b = None
    # grad-weight "inner" rotates along the tokens: they are zero-padded to a multiple of the
    # block (zeros add nothing to dYᵀ X), as an "outer" grad-input pads them.
    tokens = token_block(max_block)
    gw_max_block = tokens if gw_rot == "inner" else max_block
    dy_gw = padded_rows(dy, tokens) if gw_rot == "inner" else dy
    dyt = shared_view(dy_gw, "features x tokens", lambda t: t.t())
    if gi_rot == "outer" and gw_rot == "inner" and all(ctx.needs_input_grad[:2]):
        # grad-input rotates dY along the tokens, grad-weight dYᵀ along the same tokens by the
        # same block: the compiled path quantizes both in one kernel when told so
        # (inductor_decompositions.py).
        shared(dy_gw, DY_TRANSPOSE, lambda _: True)
    if ctx.needs_input_grad[0] and cache_weight:
        # dX = dY W: contraction over out-features, W [out, in] the cached weight's transpose.
        grad_x = torch.ops.halo.frozen_weight_matmul(
            dy, weight, "", [], True, fmt, gi_rot, max_block, granularity, rounding, check,
            f"{name} grad-input",
        ).reshape(x.shape)
    elif ctx.needs_input_grad[0]:
        # dX = dY W: contraction over out-features.
        grad_x = torch.ops.halo.scaled_matmul(
            dy, weight.to(dy.dtype).t(), fmt, gi_rot, max_block, granularity,
            rounding, "nearest", check, f"{name} grad-input",
        ).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        # dW = dYᵀ X: contraction over tokens. Its operands need no inf/NaN check of their own
        # when grad-input checked dY and the forward checked X: each check costs host time.
        pad = tokens if gw_rot == "inner" else 1
        xt = shared_view(x, ("features x tokens", dy.dtype, pad),
                         lambda t: pad_rows(t.reshape(-1, t.shape[-1]).to(dy.dtype), pad).t())
        grad_w = torch.ops.halo.scaled_matmul(
            dyt, xt, fmt, gw_rot, gw_max_block, granularity,
            rounding, "nearest", check and grad_x is None, f"{name} grad-weight",
        ).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = dy.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, *[None] * 11


quantized_linear.register_autograd(_backward, setup_context=_setup_context)
