"""`halo::frozen_linear`: `halo::quantized_linear` for a weight that does not require grad.

A frozen weight (a PEFT/LoRA base layer) is rotated and quantized once per version and cached
(weight_cache.py), instead of at every call; its gradient is never computed, so the backward is
the grad-input matmul alone, and the input is not saved for backward. (`halo::quantized_linear`
with `cache_weight` runs its forward and grad-input matmuls through the same cached-weight ops.)

`halo::frozen_weight_matmul(a, weight, transpose_weight, ...)` computes exactly what
`halo::scaled_matmul(a, op(weight).to(a.dtype), ...)` does (op: transpose or not, so both the
forward `X Wᵀ` and the grad-input `dY W` read the stored parameter itself, which is what keeps
its identity and version counter visible to the cache), with the weight side from the cache.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .quantize import FORMATS, HOST_SIDE_TAGS
from .scaled_matmul import (
    cuda_gemm,
    fused_block,
    fused_product,
    empty_product,
    gemm_with,
    has_no_elements,
    product_with_quantized_right,
    reference_gemm,
    rotated_left_operand,
    scale_for_gemm,
)
from .shared_operands import shared_view
from .weight_cache import WEIGHT_CACHE


def _frozen_weight_matmul(gemm, a, weight, fold, fold_inputs, transpose_weight, fmt, rotation,
                          max_block, granularity, rounding_a, check_finite_inputs, where):
    if has_no_elements(a):
        return empty_product(a, weight.shape[1] if transpose_weight else weight.shape[0])
    left = rotated_left_operand(a, rotation, max_block)
    right = WEIGHT_CACHE.quantized(weight, fmt, granularity, left.inner_block, transpose_weight,
                                   a.dtype, check_finite_inputs, where, fold, fold_inputs)
    return product_with_quantized_right(gemm, left, right, fmt, granularity, rounding_a,
                                        a.dtype, check_finite_inputs, where)


@torch.library.custom_op("halo::frozen_weight_matmul", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def frozen_weight_matmul(
    a: torch.Tensor,
    weight: torch.Tensor,
    fold: str,
    fold_inputs: List[torch.Tensor],
    transpose_weight: bool,
    fmt: str,
    rotation: str,
    max_block: int,
    granularity: str,
    rounding_a: str,
    check_finite_inputs: bool,
    where: str,
    fast_accum: bool = False,
) -> torch.Tensor:
    """A [M, K] @ op(W)ᵀ -> [M, N] (op(W) [N, K]), W = FOLDS.apply(fold, weight, fold_inputs)
    (the weight itself for fold ""), the weight side cached; `fast_accum` as in
    halo::scaled_matmul."""
    del fast_accum  # the reference accumulates in float32
    return _frozen_weight_matmul(reference_gemm, a, weight, fold, fold_inputs, transpose_weight,
                                 fmt, rotation, max_block, granularity, rounding_a,
                                 check_finite_inputs, where)


def fused_frozen_weight_matmul(a, weight, fold, fold_inputs, transpose_weight, fmt, rotation,
                               block, granularity, check_finite_inputs, where, fast_accum=False,
                               rounding_a="nearest", **kernels):
    """The fused path (scaled_matmul.fused_product): the activation rotated and quantized by the
    Triton kernel, the weight side from the cache (`halo::cached_quantized_weight`), then the
    GEMM. `block` comes from `fused_block`; `kernels` as fused_product takes them."""
    if has_no_elements(a):
        return empty_product(a, weight.shape[1] if transpose_weight else weight.shape[0])

    def right_gemm(qa, sa, sa_factor, b_block):
        # Not checked when computed: scale_for_gemm checks sb (inf/NaN exactly where the weight
        # is) with the activation's scales, at no extra cost per miss.
        qb, sb = torch.ops.halo.cached_quantized_weight(
            weight, fold, fold_inputs, transpose_weight, fmt, granularity, b_block, a.dtype,
            False, where)
        sa = scale_for_gemm(sa, sb, sa_factor, check_finite_inputs, where)
        return gemm_with(cuda_gemm, fast_accum)(qa, sa, qb, sb, fmt, a.dtype)

    return fused_product(a, right_gemm, fmt, rotation, block, granularity, rounding_a,
                         **kernels)


def cached_quantized_weight(weight, fold, fold_inputs, transpose_weight, fmt, granularity, block,
                            dtype, check, where):
    """`WEIGHT_CACHE.quantized(...)`: op(weight) (folded, cast to `dtype`) rotated along K by
    `block` and quantized, once per version. The cached tensors themselves are returned, on
    every call: Inductor must never reuse their buffers for other results, which the backend
    tells it (halo_compile/backend.py, `_never_reuse_cached_weights`)."""
    return WEIGHT_CACHE.quantized(weight, fmt, granularity, block, transpose_weight, dtype, check,
                                  where, fold, fold_inputs)


# Registered through torch.library.Library rather than custom_op (whose Python wrapper costs
# ~90 us a call, scaled_matmul.py): a compiled graph calls it for every cached-weight matmul.
# Only ever called below autograd (inside the cached-weight ops, or in their traced
# decomposition), on a weight that needs no gradient through it.
_LIB = torch.library.Library("halo", "FRAGMENT")
_LIB.define("cached_quantized_weight(Tensor weight, str fold, Tensor[] fold_inputs, "
            "bool transpose_weight, str fmt, str granularity, int block, ScalarType dtype, "
            "bool check, str where) -> (Tensor, Tensor)", tags=HOST_SIDE_TAGS)
_LIB.impl("cached_quantized_weight", cached_quantized_weight, "CompositeExplicitAutograd")


@torch.library.register_fake("halo::cached_quantized_weight", lib=_LIB)
def _(weight, fold, fold_inputs, transpose_weight, fmt, granularity, block, dtype, check, where):
    n, k = (weight.shape[1], weight.shape[0]) if transpose_weight else weight.shape
    return (weight.new_empty((n, k), dtype=FORMATS[fmt].dtype),
            weight.new_empty((n if granularity == "row" else 1, 1), dtype=torch.float32))


@frozen_weight_matmul.register_kernel("cuda")
def _(a, weight, fold, fold_inputs, transpose_weight, fmt, rotation, max_block, granularity,
      rounding_a, check_finite_inputs, where, fast_accum=False):
    block = fused_block(a, weight, fmt, rotation, max_block)
    if block is not None:
        return fused_frozen_weight_matmul(a, weight, fold, fold_inputs, transpose_weight, fmt,
                                          rotation, block, granularity, check_finite_inputs,
                                          where, fast_accum, rounding_a)
    return _frozen_weight_matmul(gemm_with(cuda_gemm, fast_accum), a, weight, fold, fold_inputs,
                                 transpose_weight, fmt, rotation, max_block, granularity,
                                 rounding_a, check_finite_inputs, where)


@frozen_weight_matmul.register_fake
def _(a, weight, fold, fold_inputs, transpose_weight, fmt, rotation, max_block, granularity,
      rounding_a, check_finite_inputs, where, fast_accum=False):
    n, k = (weight.shape[1], weight.shape[0]) if transpose_weight else weight.shape
    torch._check(a.dim() == 2 and a.shape[1] == k,
                 lambda: f"{where}: operand and frozen weight do not match")
    return a.new_empty((a.shape[0], n))


def frozen_linear_forward(x, weight, fold, fold_inputs, bias, weight_transposed, fmt, granularity,
                          forward_rotation, max_block, check_finite, name, fast_accum):
    x2d = shared_view(x, "tokens x features", lambda t: t.reshape(-1, t.shape[-1]))
    y = torch.ops.halo.frozen_weight_matmul(
        x2d, weight, fold, fold_inputs, weight_transposed, fmt,
        forward_rotation, max_block, granularity, "nearest", check_finite, f"{name} forward",
        fast_accum)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("halo::frozen_linear", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def frozen_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    fold: str,
    fold_inputs: List[torch.Tensor],
    bias: Optional[torch.Tensor],
    weight_transposed: bool,
    fmt: str,
    granularity: str,
    forward_rotation: str,
    grad_input_rotation: str,
    max_block: int,
    grad_rounding: str,
    check_finite: bool,
    name: str,
    fast_accum: bool,
) -> torch.Tensor:
    """y = x @ Wᵀ + bias, with W = FOLDS.apply(fold, weight, fold_inputs) (`weight` itself for
    fold ""), or its transpose when `weight_transposed` (stored [in, out], GPT-2's Conv1D).
    Neither `weight` nor the fold inputs may require grad. `fast_accum`: the forward GEMM's."""
    return frozen_linear_forward(x, weight, fold, fold_inputs, bias, weight_transposed, fmt,
                                 granularity, forward_rotation, max_block, check_finite, name,
                                 fast_accum)


@frozen_linear.register_fake
def _(x, weight, fold, fold_inputs, bias, weight_transposed, fmt, granularity, forward_rotation,
      grad_input_rotation, max_block, grad_rounding, check_finite, name, fast_accum):
    in_features, out_features = weight.shape if weight_transposed else weight.shape[::-1]
    torch._check(x.shape[-1] == in_features, lambda: f"{name}: x and weight do not match")
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    (x, weight, fold, fold_inputs, bias, transposed, fmt, granularity, _, gi_rot, max_block,
     rounding, check, name, _) = inputs
    if weight.requires_grad or any(t.requires_grad for t in fold_inputs):
        raise ValueError(f"halo::frozen_linear ({name}): the weight or a fold input requires "
                         "grad; use halo::quantized_linear for a trained weight")
    ctx.save_for_backward(weight, *fold_inputs)
    ctx.fold = fold
    ctx.x_shape = x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.settings = (transposed, fmt, gi_rot, max_block, granularity, rounding, check, name)


def _backward(ctx, grad_out):
    weight, *fold_inputs = ctx.saved_tensors
    transposed, fmt, gi_rot, max_block, granularity, rounding, check, name = ctx.settings
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        # dX = dY W: contraction over out-features; W [out, in] is op(weight)ᵀ.
        grad_x = torch.ops.halo.frozen_weight_matmul(
            dy, weight, ctx.fold, fold_inputs, not transposed, fmt, gi_rot, max_block,
            granularity, rounding, check, f"{name} grad-input",
        ).reshape(ctx.x_shape)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        grad_b = dy.sum(0).to(ctx.bias_dtype)
    return (grad_x, None, None, [None] * len(fold_inputs), grad_b, *[None] * 10)


frozen_linear.register_autograd(_backward, setup_context=_setup_context)
