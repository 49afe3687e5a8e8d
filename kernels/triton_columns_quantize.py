"""The rotate-and-quantize kernel with one scale per K index: dim 0 of x [tokens, features]
(grad-input's "outer" rotation, H along the tokens, a scale per token), and with DUAL also the
transpose scaled per feature (grad-weight's dYᵀ, rotated along the same tokens).

The kernel sees the transposed view: M lines (features) of K values (tokens), x[m, k] at
x + m * stride_xm + k * stride_xk, rotated along K by blocks of HB (0: not rotated):

    y = (I (x) H_HB) x / sqrt(HB),     scale_k = max(max_m |y[m, k]|, 1e-12) / MAX,
    q[k, m] = RN(y[m, k] / scale_k)    (q [K, M] contiguous: x's shape),
    DUAL: scale_t_m = max(max_k |y[m, k]|, 1e-12) / MAX,  qt[m, k] = RN(y[m, k] / scale_t_m)

(int8, or float8 E4M3 saturating; or stochastically rounded); granularity "tensor" takes one
scale for q, the max over all K indices.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_quantize_helpers import (
    _divisor_of,
    _hadamard_factors,
    _line_absmax,
    _max_over_splits,
    _quantized,
    _random_bits,
    _rotated,
    _scale_of,
)


@triton.jit
def _store_transposed(t, qt_at, mask, lines, amax_t_ptr, scale_t_ptr, store_scales, M,
                      EVEN: tl.constexpr, RECIP_SCALE: tl.constexpr, MAX_VALUE: tl.constexpr,
                      INV_MAX_VALUE: tl.constexpr, INV_SQRT: tl.constexpr,
                      POW2_NORM: tl.constexpr, INT8: tl.constexpr, SOFT_FP8: tl.constexpr,
                      bits, STOCHASTIC: tl.constexpr):
    """DUAL: `t` [lines, 16, 16] quantized with one scale per line (from the lines' absmaxes at
    amax_t_ptr; stored too when `store_scales`) at `qt_at`, the transpose's addresses."""
    if EVEN:
        amax = tl.load(amax_t_ptr + lines)
    else:
        amax = tl.load(amax_t_ptr + lines, mask=lines < M, other=0.0)
    scale = _scale_of(amax, RECIP_SCALE, MAX_VALUE, INV_MAX_VALUE)
    if store_scales:  # (the programs of the first K tile cover every line)
        tl.store(scale_t_ptr + lines, scale, mask=lines < M)
    divisor, inv = _divisor_of(scale, INV_SQRT, POW2_NORM)
    q = _quantized(t, divisor[:, None, None], inv[:, None, None], INT8, SOFT_FP8, MAX_VALUE,
                   bits, STOCHASTIC)
    tl.store(qt_at, q, mask=mask)


def _hadamard_quantize_columns_kernel(
    x_ptr, q_ptr, scale_ptr,
    amax_ptr,  # ABSMAX / QUANTIZE: partial absmaxes [splits, K], float32
    # DUAL: the transpose's values [M, K] contiguous and scales [M] (one per line), and its
    # absmaxes: partials [K tiles, M] (ABSMAX), their max [M] (QUANTIZE)
    qt_ptr, scale_t_ptr, amax_t_ptr,
    seed_ptr,  # STOCHASTIC: the launch's random seeds [2] (q's, qt's), int64
    M, K, stride_xm, stride_xk,
    per_split,  # lines per program
    HB: tl.constexpr,  # Hadamard block: 0 (no rotation) or a power of two 16..256
    INV_SQRT: tl.constexpr,  # 1 / sqrt(HB) (1 for HB 0)
    MODE: tl.constexpr,  # 1 ABSMAX, 2 QUANTIZE, 3 QUANTIZE_WITH_SCALE
    DUAL: tl.constexpr,  # also quantize with one scale per line, stored transposed
    SPLITS: tl.constexpr,  # programs along grid axis 1 rounded up to a power of two
    UPCAST_DOT: tl.constexpr,  # interpreter: all dot operands in float32
    SOFT_FP8: tl.constexpr,  # compute the E4M3 bits with integer operations
    RECIP_SCALE: tl.constexpr,  # scale = amax * float32(1 / MAX) (else amax / MAX)
    BLOCK_M: tl.constexpr,  # lines per loop iteration
    INT64: tl.constexpr,  # element offsets need 64 bits
    EVEN: tl.constexpr,  # BLOCK_M divides M and 256 divides K: no masks
    STOCHASTIC: tl.constexpr,  # stochastic rounding (else to nearest)
):
    """Program (a, s) owns the 256 K indices a * 256 ... and loops over split s of the lines
    (lines s * per_split ...), BLOCK_M at a time: a batch of BLOCK_M tiles [16, 16], entry b
    holding line m0 + b, K indices a * 256 + 16 * mid + low. The ABSMAX launch keeps each K
    index's absmax in registers (an elementwise running max) and stores it as the split's row
    of partials; with DUAL it also stores each line's absmax over the program's 256 K indices
    (a partial per K tile, reduced by torch between the launches). The QUANTIZE launch computes
    its 256 scales once from the partials, as the reference does, and quantizes each tile, with
    DUAL twice: per K index into q, per line into the transpose qt (Triton stages the tile
    through shared memory for a store coalesced along K)."""
    INT8: tl.constexpr = q_ptr.dtype.element_ty == tl.int8
    X_FP32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    MAX_VALUE: tl.constexpr = 127.0 if INT8 else 448.0
    INV_MAX_VALUE: tl.constexpr = 0.007874015718698502 if INT8 else 0.0022321429569274187
    POW2_NORM: tl.constexpr = (HB == 16) or (HB == 64) or (HB == 256)  # fold 1/sqrt(HB)
    R: tl.constexpr = HB // 16 if HB > 16 else 1  # G = I (x) H_R
    FIRST_PASS: tl.constexpr = 1 if MODE >= 2 else 0  # 0: absmax, 1: quantize
    LAST_PASS: tl.constexpr = 1 if MODE == 1 else 2
    n_split = tl.num_programs(1)  # (both launches have the same grid)
    pid_a = tl.program_id(0)
    pid_s = tl.program_id(1)
    start = pid_s * per_split
    b = tl.arange(0, BLOCK_M)
    i16 = tl.arange(0, 16)
    k16 = i16[:, None] * 16 + i16[None, :]
    end = tl.minimum(M, start + per_split)
    step = BLOCK_M
    k_base = pid_a * 256
    k_ok = k_base + k16 < K
    line_of_b = b[:, None, None]  # + m0
    k_of_b = k_base + k16[None, :, :]
    if INT64:
        line_of_b = line_of_b.to(tl.int64)
        k_of_b = k_of_b.to(tl.int64)
    x_tiles = x_ptr + line_of_b * stride_xm + k_of_b * stride_xk
    q_tiles = q_ptr + line_of_b + k_of_b * M  # q [K, M]: the view's transpose, contiguous
    qt_tiles = qt_ptr + line_of_b * K + k_of_b  # (DUAL)
    h16_op, g_op, h16_xop, g_xop = _hadamard_factors(BLOCK_M, R, x_ptr.dtype.element_ty,
                                                     X_FP32, UPCAST_DOT)

    # Elementwise running absmax of the tiles, reduced across lines once after the loop.
    amax_tiles = tl.full([BLOCK_M, 16, 16], 0.0, dtype=tl.float32)
    for p in tl.static_range(FIRST_PASS, LAST_PASS):
        if p == 1:
            if MODE == 2:  # this program's K indices' scales
                k256 = k_base + tl.arange(0, 256)
                amax_k = _max_over_splits(amax_ptr, k256, k256 < K, K, n_split, SPLITS)
                amax_k = tl.reshape(amax_k, (16, 16))  # as k16
                scale_k = _scale_of(amax_k, RECIP_SCALE, MAX_VALUE, INV_MAX_VALUE)
                if pid_s == 0:  # (one program per K tile stores them)
                    tl.store(scale_ptr + k_base + k16, scale_k, mask=k_ok)
                divisor, inv = _divisor_of(scale_k, INV_SQRT, POW2_NORM)
                scale3 = divisor[None, :, :]
                inv3 = inv[None, :, :]
            else:  # one, given
                scale_b = tl.load(scale_ptr + tl.full([BLOCK_M], 0, dtype=tl.int32))
                divisor, inv = _divisor_of(scale_b, INV_SQRT, POW2_NORM)
                scale3 = divisor[:, None, None]
                inv3 = inv[:, None, None]
        n_iter = (end - start + step - 1) // step
        for i in range(0, n_iter):
            o = start + i * step  # the first line of the iteration
            if INT64:
                o_at = o.to(tl.int64)
            else:
                o_at = o
            x_at = x_tiles + o_at * stride_xm
            q_at = q_tiles + o_at
            if EVEN:
                mask = None
            else:
                mask = ((o + b) < M)[:, None, None] & k_ok[None, :, :]
            x = tl.load(x_at, mask=mask, other=None if EVEN else 0.0,
                        eviction_policy="evict_first")
            y = _rotated(x, h16_op, g_op, h16_xop, g_xop, HB, R, X_FP32, UPCAST_DOT, INV_SQRT,
                         POW2_NORM)
            if p == 0:
                amax_tiles = tl.maximum(amax_tiles, tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
                if DUAL:  # each line's absmax over this program's 256 K indices
                    a_line = _line_absmax(y)
                    if POW2_NORM:
                        a_line = a_line * INV_SQRT
                    tl.store(amax_t_ptr + pid_a * M + o + b, a_line, mask=(o + b) < M)
            else:
                bits = None
                if STOCHASTIC:  # each element's own numbers, from its index in q or qt
                    at = (line_of_b + o_at) * K + k_of_b
                    bits = _random_bits(seed_ptr, 0, at)
                q = _quantized(y, scale3, inv3, INT8, SOFT_FP8, MAX_VALUE, bits, STOCHASTIC)
                tl.store(q_at, q, mask=mask)
                if DUAL:  # the same tile, scaled per line, stored transposed
                    if STOCHASTIC:
                        bits = _random_bits(seed_ptr, 1, at)
                    _store_transposed(y, qt_tiles + o_at * K, mask, o + b, amax_t_ptr,
                                      scale_t_ptr, pid_a == 0, M, EVEN, RECIP_SCALE, MAX_VALUE,
                                      INV_MAX_VALUE, INV_SQRT, POW2_NORM, INT8, SOFT_FP8, bits,
                                      STOCHASTIC)
        if p == 0:  # other programs cover other lines: partials, one row per split
            amax_tiles = tl.where(amax_tiles == amax_tiles, amax_tiles, float("inf"))  # NaN
            amax_k = tl.reduce(amax_tiles, 0, tl.standard._elementwise_max)
            if POW2_NORM:
                amax_k = amax_k * INV_SQRT
            tl.store(amax_ptr + pid_s * K + k_base + k16, amax_k, mask=k_ok)
