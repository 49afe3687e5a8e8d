"""`halo::frozen_linear`: `halo::quantized_linear` for a weight that does not require grad.

A frozen weight (a PEFT/LoRA base layer) is rotated and quantized once per version and cached
(weight_cache.py), instead of at every call; its gradient is never computed, so the backward is
the grad-input matmul alone, and the input is not saved for backward. (`halo::quantized_linear`
with `cache_weight` runs its forward and grad-input matmuls through the same cached-weight ops.)

`halo::frozen_weight_matmul(a, weight, fold_inputs, source, settings)` computes exactly what
`halo::scaled_matmul(a, op(weight).to(a.dtype), settings)` does (`source`, a WeightSource, says
whether op transposes, so that both the forward `X Wᵀ` and the grad-input `dY W` read the stored
parameter itself, which is what keeps its identity and version counter visible to the cache),
with the weight side from the cache.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .constants import FORMATS
from .quantize import HOST_SIDE_TAGS
from .scaled_matmul import (
    cuda_gemm,
    empty_product,
    fused_block,
    fused_product,
    gemm_with,
    has_no_elements,
    product_with_quantized_right,
    reference_gemm,
    rotated_left_operand,
    scale_for_gemm,
)
from .settings import LinearSettings, MatmulSettings, WeightSource
from .shared_operands import shared_view
from .weight_cache import WEIGHT_CACHE


def _right_shape(weight, source: WeightSource):
    """op(weight)'s shape [N, K]."""
    return (weight.shape[1], weight.shape[0]) if source.transpose else tuple(weight.shape)


def _frozen_weight_matmul(gemm, a, weight, fold_inputs, source: WeightSource,
                          settings: MatmulSettings):
    if has_no_elements(a):
        return empty_product(a, _right_shape(weight, source)[0])
    left = rotated_left_operand(a, settings.rotation, settings.max_block)
    right = WEIGHT_CACHE.quantized(weight, settings.format, settings.granularity,
                                   left.inner_block, source.transpose, a.dtype,
                                   settings.check_finite, settings.where, source.fold, fold_inputs)
    return product_with_quantized_right(gemm, left, right, settings, a.dtype)


@torch.library.custom_op("halo::frozen_weight_matmul", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def frozen_weight_matmul(a: torch.Tensor, weight: torch.Tensor, fold_inputs: List[torch.Tensor],
                         source: str, settings: str) -> torch.Tensor:
    """A [M, K] @ op(W)ᵀ -> [M, N] (op(W) [N, K]), W = FOLDS.apply(fold, weight, fold_inputs)
    as the encoded WeightSource `source` says, the weight side cached; `settings`: the encoded
    MatmulSettings (the reference accumulates in float32 whatever fast_accum says)."""
    return _frozen_weight_matmul(reference_gemm, a, weight, fold_inputs,
                                 WeightSource.decode(source), MatmulSettings.decode(settings))


def fused_frozen_weight_matmul(a, weight, fold_inputs, source: WeightSource,
                               settings: MatmulSettings, block, **kernels):
    """The fused path (scaled_matmul.fused_product): the activation rotated and quantized by the
    Triton kernel, the weight side from the cache (`halo::cached_quantized_weight`), then the
    GEMM. `block` comes from `fused_block`; `kernels` as fused_product takes them."""
    if has_no_elements(a):
        return empty_product(a, _right_shape(weight, source)[0])

    def right_gemm(qa, sa, sa_factor, b_block):
        # Not checked when computed: scale_for_gemm checks sb (inf/NaN exactly where the weight
        # is) with the activation's scales, at no extra cost per miss.
        qb, sb = torch.ops.halo.cached_quantized_weight(
            weight, fold_inputs, source.encoded, settings.unchecked.encoded, b_block, a.dtype)
        sa = scale_for_gemm(sa, sb, sa_factor, settings)
        return gemm_with(cuda_gemm, settings.fast_accum)(qa, sa, qb, sb, settings.format,
                                                         a.dtype)

    return fused_product(a, right_gemm, settings, block, **kernels)


def cached_quantized_weight(weight, fold_inputs, source, settings, block, dtype):
    """`WEIGHT_CACHE.quantized(...)`: op(weight) (folded, cast to `dtype`) rotated along K by
    `block` and quantized as the encoded MatmulSettings `settings` say (their format,
    granularity, check and name), once per version. The cached tensors themselves are returned,
    on every call: Inductor must never reuse their buffers for other results, which the backend
    tells it (halo_compile/inductor_patches.py, `never_reuse_cached_weights`)."""
    source, settings = WeightSource.decode(source), MatmulSettings.decode(settings)
    return WEIGHT_CACHE.quantized(weight, settings.format, settings.granularity, block,
                                  source.transpose, dtype, settings.check_finite, settings.where,
                                  source.fold, fold_inputs)


# Registered through torch.library.Library rather than custom_op (whose Python wrapper costs
# ~90 us a call, scaled_matmul.py): a compiled graph calls it for every cached-weight matmul.
# Only ever called below autograd (inside the cached-weight ops, or in their traced
# decomposition), on a weight that needs no gradient through it.
_LIB = torch.library.Library("halo", "FRAGMENT")
_LIB.define("cached_quantized_weight(Tensor weight, Tensor[] fold_inputs, str source, "
            "str settings, int block, ScalarType dtype) -> (Tensor, Tensor)",
            tags=HOST_SIDE_TAGS)
_LIB.impl("cached_quantized_weight", cached_quantized_weight, "CompositeExplicitAutograd")


@torch.library.register_fake("halo::cached_quantized_weight", lib=_LIB)
def _(weight, fold_inputs, source, settings, block, dtype):
    n, k = _right_shape(weight, WeightSource.decode(source))
    settings = MatmulSettings.decode(settings)
    rows = n if settings.granularity == "row" else 1
    return (weight.new_empty((n, k), dtype=FORMATS[settings.format].dtype),
            weight.new_empty((rows, 1), dtype=torch.float32))


@frozen_weight_matmul.register_kernel("cuda")
def _(a, weight, fold_inputs, source, settings):
    source, settings = WeightSource.decode(source), MatmulSettings.decode(settings)
    block = fused_block(a, weight, settings)
    if block is not None:
        return fused_frozen_weight_matmul(a, weight, fold_inputs, source, settings, block)
    return _frozen_weight_matmul(gemm_with(cuda_gemm, settings.fast_accum), a, weight,
                                 fold_inputs, source, settings)


@frozen_weight_matmul.register_fake
def _(a, weight, fold_inputs, source, settings):
    n, k = _right_shape(weight, WeightSource.decode(source))
    where = MatmulSettings.decode(settings).where
    torch._check(a.dim() == 2 and a.shape[1] == k,
                 lambda: f"{where}: operand and frozen weight do not match")
    return a.new_empty((a.shape[0], n))


def frozen_linear_forward(x, weight, fold_inputs, bias, source: WeightSource,
                          settings: LinearSettings):
    x2d = shared_view(x, "tokens x features", lambda t: t.reshape(-1, t.shape[-1]))
    y = torch.ops.halo.frozen_weight_matmul(x2d, weight, fold_inputs, source.encoded,
                                            settings.forward.encoded)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("halo::frozen_linear", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def frozen_linear(x: torch.Tensor, weight: torch.Tensor, fold_inputs: List[torch.Tensor],
                  bias: Optional[torch.Tensor], source: str, settings: str) -> torch.Tensor:
    """y = x @ Wᵀ + bias, with W = op(FOLDS.apply(fold, weight, fold_inputs)) as the encoded
    WeightSource `source` says (`weight` itself for fold "", its transpose when stored [in, out],
    GPT-2's Conv1D); `settings`: the encoded LinearSettings (grad-weight's are unused).
    Neither `weight` nor the fold inputs may require grad."""
    return frozen_linear_forward(x, weight, fold_inputs, bias, WeightSource.decode(source),
                                 LinearSettings.decode(settings))


@frozen_linear.register_fake
def _(x, weight, fold_inputs, bias, source, settings):
    out_features, in_features = _right_shape(weight, WeightSource.decode(source))
    name = LinearSettings.decode(settings).name
    torch._check(x.shape[-1] == in_features, lambda: f"{name}: x and weight do not match")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, weight, fold_inputs, bias, source, settings = inputs
    settings = LinearSettings.decode(settings)
    if weight.requires_grad or any(t.requires_grad for t in fold_inputs):
        raise ValueError(f"halo::frozen_linear ({settings.name}): the weight or a fold input "
                         "requires grad; use halo::quantized_linear for a trained weight")
    ctx.save_for_backward(weight, *fold_inputs)
    ctx.x_shape = x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.source, ctx.settings = WeightSource.decode(source), settings


def _backward(ctx, grad_out):
    weight, *fold_inputs = ctx.saved_tensors
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        # dX = dY W: contraction over out-features; W [out, in] is op(weight)ᵀ.
        grad_x = torch.ops.halo.frozen_weight_matmul(
            dy, weight, fold_inputs, ctx.source.transposed.encoded,
            ctx.settings.grad_input.encoded,
        ).reshape(ctx.x_shape)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_b = dy.sum(0).to(ctx.bias_dtype)
    return grad_x, None, [None] * len(fold_inputs), grad_b, None, None


frozen_linear.register_autograd(_backward, setup_context=_setup_context)
