"""`halo::scaled_matmul`: one quantized matmul `A Bᵀ` with an optional Hadamard rotation.

Both operands are given with the contraction dimension last (A [M, K], B [N, K]), which is the
layout every matmul of a linear layer can be put in:

    forward      Y  = X  Wᵀ     A = X  [T, in],   B = W  [out, in]
    grad-input   dX = dY W      A = dY [T, out],  B = Wᵀ [in, out]
    grad-weight  dW = dYᵀ X     A = dYᵀ [out, T], B = Xᵀ [in, T]

Rotations (the HALO placements):
    "none"   Q(A) Q(B)ᵀ
    "inner"  Q(A H) Q(B H)ᵀ            H along K on both operands: cancels inside the product
    "outer"  H [Q(H A) Q(B)ᵀ]          H along M on A only: rotates the output, undone afterwards

`scaled_matmul_reference` is the plain-torch reference (float32 matmul of the exact FP8/INT8
values, so it computes what the GPU GEMM computes up to summation order); the CUDA kernel runs
the GEMM through cuBLASLt (`torch._scaled_mm`, FP8) or a Triton INT8 GEMM whose epilogue applies
the scales (`halo::int8_scaled_mm`).

On CUDA each operand is rotated and quantized by one launch of the fused Triton kernel
(triton_hadamard_quantize.py), which reads the operand once, in whatever strides it has (the
grad-weight operands dYᵀ and Xᵀ are transposed views: the kernel writes their quantized
transposes directly), and writes the 8-bit values and float32 scales. The "outer" rotation's
undoing on the output is one batched bf16 product with the ±1 Hadamard block, its 1/sqrt(block)
folded into A's scales (rounding to nearest or stochastically, in the kernel). Blocks above
256 ("full" Hadamards of long dimensions), float64 and fmt "none" take the unfused path (torch
rotation and quantization).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .constants import MAX_BLOCK
from .hadamard import block_hadamard, hadamard_block_size, hadamard_signs, pad_rows, token_block
from .quantize import (
    HOST_SIDE_TAGS,
    absmax,
    check_all_finite,
    check_finite,
    check_operands_finite,
    operand_name,
    quantize,
)
from .settings import MatmulSettings
from .shared_operands import shared_view
from .triton_hadamard_quantize import hadamard_quantize_triton
from .triton_int8_matmul import int8_scaled_mm  # noqa: F401  (registers halo::int8_scaled_mm)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Rotations and scaling run in float32 (float64 stays float64, as in block_hadamard)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class LeftOperand(NamedTuple):
    """The left operand A as rotated for the product, and what the rest of the product needs."""

    rotated: torch.Tensor  # in the compute dtype; with an "outer" rotation, rows zero-padded
    inner_block: int  # the block the right operand is rotated by along K ("inner"), or 0
    outer_block: int  # the block to undo on the output's rows ("outer"), or 0
    rows: object  # A's rows before padding: the output's


def rotated_left_operand(a, rotation: str, max_block: int) -> LeftOperand:
    """A rotated as `rotation` places it. "outer" rotates along the rows (the tokens, for the
    forward and grad-input) by `token_block(max_block)`, the rows zero-padded to a multiple."""
    if rotation == "inner" and (block := hadamard_block_size(a.shape[1], max_block)):
        return LeftOperand(block_hadamard(a, block, dim=1), block, 0, a.shape[0])
    if rotation == "outer":
        block = token_block(max_block)
        return LeftOperand(block_hadamard(pad_rows(a, block), block, dim=0), 0, block,
                           a.shape[0])  # (the reference runs eagerly: sizes are ints)
    return LeftOperand(a.to(_compute_dtype(a)), 0, 0, a.shape[0])


def quantized_operand(x, fmt, granularity, block, rounding, check, where):
    """One operand, rotated along its last dimension in blocks of `block` (0: not rotated, or
    already rotated), then quantized. Returns (values, float32 scales); for fmt "none",
    (the float tensor, None). Raises NonFiniteInputError on inf/NaN when `check`."""
    x = block_hadamard(x, block, dim=1) if block else x.to(_compute_dtype(x))
    amax = absmax(x, granularity if fmt != "none" else "tensor")
    if check:
        check_finite(amax, where)
    if fmt == "none":
        return x, None
    return quantize(x, fmt, granularity, rounding, amax)


def product_with_quantized_right(gemm, left: LeftOperand, right, settings: MatmulSettings,
                                 out_dtype):
    """The rotated left operand times the right operand `right` = quantized_operand(...):
    quantize the left one, run `gemm`, undo an "outer" rotation on the output."""
    fmt = settings.format
    qa, sa = quantized_operand(left.rotated, fmt, settings.granularity, 0, settings.rounding_a,
                               settings.check_finite, operand_name(settings.where, "left"))
    out = qa @ right[0].t() if fmt == "none" else gemm(qa, sa, *right, fmt, out_dtype)
    if left.outer_block:
        out = block_hadamard(out, left.outer_block, dim=0)[:left.rows]  # padding dropped
    # Contiguous, as the fake kernel promises (Inductor asserts output strides): the outer
    # rotation's movedim and the CUDA GEMM's un-padding slice would otherwise leak strides.
    return out.to(out_dtype).contiguous()


def has_no_elements(*tensors) -> bool:
    """Whether an operand is empty (an empty batch, a zero-length sequence). Dynamo specializes
    sizes 0 and 1, so this is static in a compiled graph; an unbacked size counts as non-empty."""
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false
    except ImportError:  # a torch without it
        guard_or_false = bool
    return any(guard_or_false(t.numel() == 0) for t in tensors)


def empty_product(a, n):
    """What eager's matmul gives for an empty operand, without launching anything (amax and
    the quantize kernels refuse empty tensors): A [M, K] times an [N, K] operand is [M, N], all
    zeros when K is 0 (so grad-weight is zero for an empty batch, as in eager)."""
    return a.new_zeros((a.shape[0], n))


def _scaled_matmul(gemm, a, b, settings: MatmulSettings):
    if has_no_elements(a, b):
        return empty_product(a, b.shape[0])
    left = rotated_left_operand(a, settings.rotation, settings.max_block)
    right = quantized_operand(b, settings.format, settings.granularity, left.inner_block,
                              settings.rounding_b, settings.check_finite,
                              operand_name(settings.where, "right"))
    return product_with_quantized_right(gemm, left, right, settings, a.dtype)


def reference_gemm(qa, sa, qb, sb, fmt, out_dtype):
    """Float32 product of the exact low-precision values, then the scales."""
    del fmt, out_dtype
    return (qa.float() @ qb.float().t()) * sa * sb.t()


def cuda_gemm(qa, sa, qb, sb, fmt, out_dtype, fast_accum=False):
    """The low-precision GEMM on the GPU. INT8: the Triton kernel with the scales in its
    epilogue (triton_int8_matmul.py). FP8: cuBLASLt, every dimension padded to a multiple of 16
    (its alignment rule; zero rows and columns change nothing) and the result sliced back;
    `fast_accum` lets the tensor cores accumulate without cuBLASLt's periodic promotion to
    float32 (torchao's float8 recipes do so in the forward; 13% faster on an H100 at
    8192x4096x14336, docs/BENCHMARKS.md)."""
    if fmt == "int8":
        return torch.ops.halo.int8_scaled_mm(qa, sa, qb, sb, out_dtype)
    m, n = qa.shape[0], qb.shape[0]
    # cuBLASLt wants K and N multiples of 16, not M (A's rows: the tokens, in the forward).
    qa, qb = _pad_rows_cols(qa, 1, 16), _pad_rows_cols(qb, 16, 16)
    if out_dtype == torch.bfloat16:
        # Row-wise (or tensor-wise) scales applied in the GEMM epilogue; needs a bf16 output.
        sa_p = F.pad(sa, (0, 0, 0, qa.shape[0] - sa.shape[0]), value=1.0) if sa.numel() > 1 else sa
        sb_p = F.pad(sb, (0, 0, 0, qb.shape[0] - sb.shape[0]), value=1.0) if sb.numel() > 1 else sb
        out = torch._scaled_mm(qa, qb.t(), scale_a=sa_p.contiguous(), scale_b=sb_p.t().contiguous(),
                               out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        return out[:m, :n]
    one = torch.ones((), device=qa.device, dtype=torch.float32)
    out = torch._scaled_mm(qa, qb.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                           use_fast_accum=fast_accum)
    return out[:m, :n] * sa * sb.t()


def gemm_with(gemm, fast_accum: bool):
    """`gemm` with its accumulation mode fixed (the helpers call gemm(qa, sa, qb, sb, fmt,
    out_dtype))."""
    return functools.partial(gemm, fast_accum=True) if fast_accum else gemm


def _pad_rows_cols(t, row_multiple, col_multiple):
    rows = -t.shape[0] % row_multiple
    cols = -t.shape[1] % col_multiple
    # Symbolic sizes (the tokens, under dynamic shapes) are padded unless provably aligned:
    # a branch on their value would specialize the graph.
    if not (statically_known_true(rows == 0) and statically_known_true(cols == 0)):
        # F.pad has no FP8 kernel: pad the raw bytes, whose zero is the format's +0.
        raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
        raw = F.pad(raw, (0, cols, 0, rows))
        t = raw.view(t.dtype)
    return t.contiguous()


_DEFAULT_SETTINGS = MatmulSettings()


def scaled_matmul_reference(a, b, settings: MatmulSettings = _DEFAULT_SETTINGS):
    """Plain-torch reference of halo::scaled_matmul (runs on any device; it accumulates in
    float32 whatever `settings.fast_accum` says)."""
    return _scaled_matmul(reference_gemm, a, b, settings)


@torch.library.custom_op("halo::scaled_matmul", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def scaled_matmul(a: torch.Tensor, b: torch.Tensor, settings: str) -> torch.Tensor:
    """A [M, K] @ B [N, K]ᵀ -> [M, N] in A's dtype, quantized as `settings` (the encoded
    MatmulSettings) says."""
    return scaled_matmul_reference(a, b, MatmulSettings.decode(settings))


_FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fused_block(a, b, settings: MatmulSettings):
    """The Hadamard block the fused CUDA path would use, or None where it does not apply."""
    rotation, max_block = settings.rotation, settings.max_block
    if settings.format == "none":
        return None
    if a.dtype not in _FUSED_DTYPES or b.dtype not in _FUSED_DTYPES:
        return None
    if rotation == "none":
        return 0
    if rotation == "outer":
        return token_block(max_block)
    block = hadamard_block_size(a.shape[1], max_block)
    return block if block <= MAX_BLOCK else None


@torch.library.custom_op("halo::checked_scale", mutates_args=(),
                         tags=HOST_SIDE_TAGS)
def checked_scale(sa: torch.Tensor, sb: torch.Tensor, sa_factor: float,
                  where: str) -> torch.Tensor:
    """`sa * sa_factor`, the left operand's GEMM scales, once both operands' scales are checked
    finite (`check_operands_finite`: on CUDA deferred, without a host sync). The check is an op
    whose output the GEMM consumes so that a compiled graph can neither drop nor reorder it."""
    check_operands_finite(sa, sb, where)
    return sa * sa_factor


@checked_scale.register_fake
def _(sa, sb, sa_factor, where):
    return torch.empty_like(sa)


def report_nonfinite(token, scales, wheres, copy=False) -> None:
    """The inf/NaN check of many operands at once (`scales[i]` belongs to the operand named
    `wheres[i]`): what passes/batch_nonfinite_checks.py puts at the end of a compiled graph in
    place of one `halo::checked_scale` call per matmul. `token` is a dummy whose declared
    mutation makes the op a side effect that no dead-code elimination removes. `copy`: the
    scales are CUDA graph outputs, overwritten by the next replay (see check_all_finite)."""
    del token
    check_all_finite(list(zip(wheres, scales, strict=False)), copy)


# Registered through torch.library.Library rather than custom_op: a compiled graph calls it on
# every run, and custom_op's Python wrapper costs ~90 us a call with 40 tensors (4x the
# dispatcher's own). It is only ever inserted after AOTAutograd, so it needs neither autograd
# nor functionalization.
_LIB = torch.library.Library("halo", "FRAGMENT")
_LIB.define("report_nonfinite(Tensor(a!) token, Tensor[] scales, str[] wheres, bool copy=False)"
            " -> ()", tags=HOST_SIDE_TAGS)
_LIB.impl("report_nonfinite", report_nonfinite, "CompositeExplicitAutograd")


@torch.library.register_fake("halo::report_nonfinite", lib=_LIB)
def _(token, scales, wheres, copy=False):
    return None


def scale_for_gemm(sa, sb, sa_factor, settings: MatmulSettings):
    """`sa * sa_factor`, the left operand's GEMM scales; with the check on, through
    `halo::checked_scale` (the scales are inf/NaN exactly where their operand is)."""
    if settings.check_finite:
        return torch.ops.halo.checked_scale(sa, sb, sa_factor, settings.where)
    return sa * sa_factor if sa_factor != 1.0 else sa


def fused_product(a, right_gemm, settings: MatmulSettings, block,
                  quantize_operand=hadamard_quantize_triton, signs=hadamard_signs):
    """The fused path: A rotated and quantized by one Triton kernel launch, then
    `right_gemm(qa, sa, sa_factor, b_block)`, which brings the right operand (rotated along K by
    `b_block`), scales A by sa * sa_factor and runs the GEMM. `block` comes from `fused_block`.
    `quantize_operand` runs the kernel: compiled on CUDA, interpreted on the CPU (where tests
    run it with `reference_gemm`), or `torch.ops.halo.hadamard_quantize` when Inductor traces it
    (inductor_decompositions.py), which also passes the traceable `sylvester_signs`."""
    out_dtype, rows = a.dtype, a.shape[0]
    outer = settings.rotation == "outer" and block
    # "outer": the tokens zero-padded to a multiple of the block (hadamard.token_block)
    padded = padded_rows(a, block) if outer else a
    qa, sa = quantize_operand(padded, settings.format, settings.granularity, block,
                              0 if outer else 1, settings.rounding_a)
    # "outer": H's normalisation folded into A's scales, applied in the GEMM epilogue.
    out = right_gemm(qa, sa, 1.0 / math.sqrt(block) if outer else 1.0, 0 if outer else block)
    if outer:
        out = unrotate_rows(out, block, signs)
    if padded is not a:
        out = out[:rows]
    return out.to(out_dtype).contiguous()


def padded_rows(t, multiple):
    """`pad_rows(t, multiple)` as a shared view of `t` (shared_operands.py): quantizations of the
    padded tensor are shared as those of `t` itself are (grad-input's dY with grad-weight's)."""
    if statically_known_true(t.shape[0] % multiple == 0):
        return t
    return shared_view(t, ("rows padded to a multiple of", multiple),
                       lambda x: pad_rows(x, multiple))


def unrotate_rows(out, block, signs=hadamard_signs):
    """Undo an "outer" rotation on the rows of a GEMM's output, its 1/sqrt(block) already in the
    scales: the ±1 block (exact in bf16) times each block of rows, one batched GEMM in the
    output's dtype with float32 accumulation. It is linear, so a sum of such outputs is
    un-rotated once (passes/merge_unrotations.py)."""
    return torch.matmul(signs(block, out.dtype, out.device),
                        out.reshape(-1, block, out.shape[1])).reshape(out.shape)


def fused_scaled_matmul(gemm, a, b, settings: MatmulSettings, block,
                        quantize_operand=hadamard_quantize_triton, signs=hadamard_signs):
    """`fused_product` with B rotated and quantized by the same kernel."""
    if has_no_elements(a, b):
        return empty_product(a, b.shape[0])

    def right_gemm(qa, sa, sa_factor, b_block):
        qb, sb = quantize_operand(b, settings.format, settings.granularity, b_block, 1,
                                  settings.rounding_b)
        sa = scale_for_gemm(sa, sb, sa_factor, settings)
        return gemm(qa, sa, qb, sb, settings.format, a.dtype)

    return fused_product(a, right_gemm, settings, block, quantize_operand, signs)


@scaled_matmul.register_kernel("cuda")
def _(a, b, settings):
    settings = MatmulSettings.decode(settings)
    gemm = gemm_with(cuda_gemm, settings.fast_accum)
    block = fused_block(a, b, settings)
    if block is not None:
        return fused_scaled_matmul(gemm, a, b, settings, block)
    return _scaled_matmul(gemm, a, b, settings)


@scaled_matmul.register_fake
def _(a, b, settings):
    MatmulSettings.decode(settings)  # an invalid bundle fails when traced, as when run
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "scaled_matmul takes 2-D operands")
    torch._check(a.shape[1] == b.shape[1], lambda: "scaled_matmul: inner dimensions differ")
    return a.new_empty((a.shape[0], b.shape[0]))
