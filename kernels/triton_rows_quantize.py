"""The rotate-and-quantize kernel with one scale per line: rows of a row-major tensor, or of a
strided view read in place (a transpose: grad-weight's dYᵀ and Xᵀ, grad-input's Wᵀ).

For M lines of K values x[m, k] (at x + m * stride_xm + k * stride_xk), rotated along K by
blocks of HB (0: not rotated), with per-line absmax a_m = max_k |y[m, k]|:

    y = x (I (x) H_HB) / sqrt(HB),   scale_m = max(a_m, 1e-12) / MAX,   q = RN(y[m, k] / scale_m)

into q [M, K] contiguous (int8, or float8 E4M3 saturating; or stochastically rounded), and the
scales [M] float32; granularity "tensor" takes one scale, the max over all lines.
"""

from __future__ import annotations

import triton.language as tl

from .triton_quantize_helpers import (
    _divisor_of,
    _hadamard_factors,
    _max_over_splits,
    _quantized,
    _random_bits,
    _rotated,
    _scale_of,
)


def _hadamard_quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr,
    amax_ptr,  # ABSMAX / QUANTIZE: partial absmaxes [splits, M], float32
    seed_ptr,  # STOCHASTIC: the launch's random seeds, int64
    M, K, stride_xm, stride_xk,
    per_split,  # K indices per program
    n_split,  # programs along grid axis 1 (rows of partial absmaxes)
    HB: tl.constexpr,  # Hadamard block: 0 (no rotation) or a power of two 16..256
    INV_SQRT: tl.constexpr,  # 1 / sqrt(HB) (1 for HB 0)
    MODE: tl.constexpr,  # 0 ONE_LAUNCH, 1 ABSMAX, 2 QUANTIZE, 3 QUANTIZE_WITH_SCALE
    SPLITS: tl.constexpr,  # n_split rounded up to a power of two
    UPCAST_DOT: tl.constexpr,  # interpreter: all dot operands in float32
    SOFT_FP8: tl.constexpr,  # compute the E4M3 bits with integer operations
    RECIP_SCALE: tl.constexpr,  # scale = amax * float32(1 / MAX) (else amax / MAX)
    BLOCK_M: tl.constexpr,
    NT: tl.constexpr,  # 256-column tiles per line and loop iteration
    INT64: tl.constexpr,  # element offsets need 64 bits
    EVEN: tl.constexpr,  # BLOCK_M divides M and NT * 256 divides K: no masks
    STOCHASTIC: tl.constexpr,  # stochastic rounding (else to nearest)
):
    """Program (a, s) owns lines a * BLOCK_M ... and loops over split s of K (K indices
    s * per_split ...), NT tiles of 256 per line at a time: a batch of NB = BLOCK_M * NT tiles
    [16, 16], entry b holding line a * BLOCK_M + b // NT, K indices k0 + 256 * (b % NT) +
    16 * mid + low. Pass 0 keeps an elementwise running absmax of the rotated tiles (reduced
    across lanes once, after the loop); pass 1 quantizes. ONE_LAUNCH runs both, the second
    backwards (the tiles loaded last are the likeliest to be still in L2); with K split over
    programs, or a tensor scale, an ABSMAX launch stores each program's partial absmaxes and a
    QUANTIZE launch computes the scales from their max, as the reference does."""
    INT8: tl.constexpr = q_ptr.dtype.element_ty == tl.int8
    X_FP32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    MAX_VALUE: tl.constexpr = 127.0 if INT8 else 448.0
    INV_MAX_VALUE: tl.constexpr = 0.007874015718698502 if INT8 else 0.0022321429569274187
    POW2_NORM: tl.constexpr = (HB == 16) or (HB == 64) or (HB == 256)  # fold 1/sqrt(HB)
    R: tl.constexpr = HB // 16 if HB > 16 else 1  # G = I (x) H_R
    NB: tl.constexpr = BLOCK_M * NT
    FIRST_PASS: tl.constexpr = 1 if MODE >= 2 else 0  # 0: absmax, 1: quantize
    LAST_PASS: tl.constexpr = 1 if MODE == 1 else 2
    pid_a = tl.program_id(0)
    pid_s = tl.program_id(1)
    start = pid_s * per_split
    b = tl.arange(0, NB)
    i16 = tl.arange(0, 16)
    k16 = i16[:, None] * 16 + i16[None, :]
    end = tl.minimum(K, start + per_split)
    step = NT * 256
    rows = pid_a * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    b_row = pid_a * BLOCK_M + b // NT
    b_ok = (b_row < M)[:, None, None]
    tile_off = ((b % NT) * 256)[:, None, None] + k16[None, :, :]
    line_of_b = b_row[:, None, None]
    k_of_b = tile_off  # + k0
    if INT64:
        line_of_b = line_of_b.to(tl.int64)
        k_of_b = k_of_b.to(tl.int64)
    x_tiles = x_ptr + line_of_b * stride_xm + k_of_b * stride_xk
    q_tiles = q_ptr + line_of_b * K + k_of_b
    h16_op, g_op, h16_xop, g_xop = _hadamard_factors(NB, R, x_ptr.dtype.element_ty, X_FP32,
                                                     UPCAST_DOT)

    amax_b = tl.full([NB], 0.0, dtype=tl.float32)  # (defined for the second pass's scope)
    # Elementwise running absmax of the tiles, reduced across lanes once after the loop.
    amax_tiles = tl.full([NB, 16, 16], 0.0, dtype=tl.float32)
    for p in tl.static_range(FIRST_PASS, LAST_PASS):
        if p == 1:
            if MODE == 0 or MODE == 2:  # per line
                if MODE == 0:
                    amax = tl.reshape(amax_b, (BLOCK_M, NT))
                    amax = tl.reduce(amax, 1, tl.standard._elementwise_max)
                else:  # each line's absmax, from the ABSMAX launch
                    amax = _max_over_splits(amax_ptr, rows, row_ok, M, n_split, SPLITS)
                scale = _scale_of(amax, RECIP_SCALE, MAX_VALUE, INV_MAX_VALUE)
                if pid_s == 0:  # (K split: one program per line block stores them)
                    tl.store(scale_ptr + rows, scale, mask=row_ok)
                scale_b = tl.reshape(tl.broadcast_to(scale[:, None], (BLOCK_M, NT)), (NB,))
            else:  # one, given
                scale_b = tl.load(scale_ptr + tl.full([NB], 0, dtype=tl.int32))
            divisor, inv = _divisor_of(scale_b, INV_SQRT, POW2_NORM)
            scale3 = divisor[:, None, None]
            inv3 = inv[:, None, None]
        n_iter = (end - start + step - 1) // step
        for i in range(0, n_iter):
            if p == 1 and MODE == 0:
                # Backwards: the tiles the absmax loop loaded last are the likeliest to be
                # still in L2 (a 14336-wide bf16 row is 28 KiB, and thousands are in flight).
                o = start + (n_iter - 1 - i) * step
            else:
                o = start + i * step
            if INT64:
                o_at = o.to(tl.int64)
            else:
                o_at = o
            x_at = x_tiles + o_at * stride_xk  # o is the first K index of the iteration
            q_at = q_tiles + o_at
            if EVEN:
                mask = None
            else:
                mask = b_ok & (o + tile_off < K)
            if p == 0 and MODE == 0:  # read again in the second pass: keep it in L2
                x = tl.load(x_at, mask=mask, other=None if EVEN else 0.0,
                            eviction_policy="evict_last")
            else:
                x = tl.load(x_at, mask=mask, other=None if EVEN else 0.0,
                            eviction_policy="evict_first")
            y = _rotated(x, h16_op, g_op, h16_xop, g_xop, HB, R, X_FP32, UPCAST_DOT, INV_SQRT,
                         POW2_NORM)
            if p == 0:
                amax_tiles = tl.maximum(amax_tiles, tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
            else:
                bits = None
                if STOCHASTIC:  # each element's own numbers, from its index (computed here:
                    # a tile of indices kept live across the loop would cost registers)
                    bits = _random_bits(seed_ptr, 0, line_of_b * K + k_of_b + o_at)
                q = _quantized(y, scale3, inv3, INT8, SOFT_FP8, MAX_VALUE, bits, STOCHASTIC)
                tl.store(q_at, q, mask=mask)
        if p == 0:
            amax_tiles = tl.where(amax_tiles == amax_tiles, amax_tiles, float("inf"))  # NaN
            amax_b = tl.reduce(amax_tiles, 2, tl.standard._elementwise_max)
            amax_b = tl.reduce(amax_b, 1, tl.standard._elementwise_max)
            if POW2_NORM:
                amax_b = amax_b * INV_SQRT
            if MODE == 1:  # other programs may cover other K ranges
                amax = tl.reshape(amax_b, (BLOCK_M, NT))
                amax = tl.reduce(amax, 1, tl.standard._elementwise_max)
                tl.store(amax_ptr + pid_s * M + rows, amax, mask=row_ok)
