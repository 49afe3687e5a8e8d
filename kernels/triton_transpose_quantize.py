"""The quantize kernel of a strided view without rotation (a transpose: grad-weight's dYᵀ and
Xᵀ with HALO-2, grad-input's Wᵀ with an "outer" or no rotation), one scale per line:

    scale_m = max(max_k |x[m, k]|, 1e-12) / MAX,    q[m, k] = RN(x[m, k] / scale_m)

for M lines of K values x[m, k] at x + m * stride_xm + k * stride_xk (stride_xm 1: a [K, M]
tensor seen as its transpose), into q [M, K] contiguous (int8, or float8 E4M3 saturating; or
stochastically rounded); granularity "tensor" takes one scale, the max over all lines.
"""

from __future__ import annotations

import triton.language as tl

from .triton_quantize_helpers import (
    _divisor_of,
    _max_over_splits,
    _quantized,
    _random_bits,
    _scale_of,
)


def _transpose_quantize_kernel(
    x_ptr, q_ptr, scale_ptr,
    amax_ptr,  # partial absmaxes [splits, M], float32
    seed_ptr,  # STOCHASTIC: the launch's random seed, int64
    M, K, stride_xm, stride_xk,
    per_split,  # K indices per program
    n_split,  # programs along K of the ABSMAX launch (rows of partials at amax_ptr)
    MODE: tl.constexpr,  # 1 ABSMAX, 2 QUANTIZE, 3 QUANTIZE_WITH_SCALE
    SPLITS: tl.constexpr,  # n_split rounded up to a power of two
    SOFT_FP8: tl.constexpr,  # compute the E4M3 bits with integer operations
    RECIP_SCALE: tl.constexpr,  # scale = amax * float32(1 / MAX) (else amax / MAX)
    INT64: tl.constexpr,  # element offsets need 64 bits
    BLOCK_M: tl.constexpr,  # lines per program
    BLOCK_K: tl.constexpr,  # K indices per loop iteration
    EVEN: tl.constexpr,  # BLOCK_M divides M, BLOCK_K divides per_split and K: no masks
    STOCHASTIC: tl.constexpr,  # stochastic rounding (else to nearest)
):
    """Program (a, s) owns lines a * BLOCK_M ... and loops over K indices s * per_split ...,
    a [BLOCK_K, BLOCK_M] tile at a time, loaded coalesced along the lines and stored coalesced
    along K (Triton stages it through shared memory). The ABSMAX launch stores each program's
    partial absmax of each of its lines; the QUANTIZE launch (more, shorter programs) computes
    the scales from their max, as the reference does. None of the rotating kernels' [16, 16]
    batching: without a rotation it is pure overhead."""
    INT8: tl.constexpr = q_ptr.dtype.element_ty == tl.int8
    MAX_VALUE: tl.constexpr = 127.0 if INT8 else 448.0
    INV_MAX_VALUE: tl.constexpr = 0.007874015718698502 if INT8 else 0.0022321429569274187
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    lines = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    line_ok = lines < M
    ks = tl.arange(0, BLOCK_K)
    start = pid_k * per_split
    end = tl.minimum(K, start + per_split)
    if INT64:
        x_tile = (x_ptr + ks.to(tl.int64)[:, None] * stride_xk
                  + lines.to(tl.int64)[None, :] * stride_xm)
        q_index = lines.to(tl.int64)[None, :] * K + ks[:, None]
    else:
        x_tile = x_ptr + ks[:, None] * stride_xk + lines[None, :] * stride_xm
        q_index = lines[None, :] * K + ks[:, None]
    q_tile = q_ptr + q_index
    if MODE == 1:
        amax = tl.full([BLOCK_K, BLOCK_M], 0.0, dtype=tl.float32)  # elementwise, reduced after
    else:
        if MODE == 2:
            line_amax = _max_over_splits(amax_ptr, lines, line_ok, M, n_split, SPLITS)
            scale = _scale_of(line_amax, RECIP_SCALE, MAX_VALUE, INV_MAX_VALUE)
            if pid_k == 0:
                tl.store(scale_ptr + lines, scale, mask=line_ok)
        else:
            scale = tl.load(scale_ptr + tl.full([BLOCK_M], 0, dtype=tl.int32))
        divisor, inv = _divisor_of(scale, 1.0, False)
    for k0 in range(start, end, BLOCK_K):
        if INT64:
            k_at = k0.to(tl.int64)
        else:
            k_at = k0
        if EVEN:
            mask = None
        else:
            mask = ((k0 + ks) < end)[:, None] & line_ok[None, :]
        x = tl.load(x_tile + k_at * stride_xk, mask=mask, other=None if EVEN else 0.0,
                    eviction_policy="evict_first").to(tl.float32)
        if MODE == 1:
            amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        else:
            bits = None
            if STOCHASTIC:  # q's element indices
                bits = _random_bits(seed_ptr, 0, q_index + k_at)
            q = _quantized(x, divisor[None, :], inv[None, :], INT8, SOFT_FP8, MAX_VALUE, bits,
                           STOCHASTIC)
            tl.store(q_tile + k_at, q, mask=mask)
    if MODE == 1:
        amax = tl.where(amax == amax, amax, float("inf"))  # NaN
        amax = tl.reduce(amax, 0, tl.standard._elementwise_max)
        tl.store(amax_ptr + pid_k * M + lines, amax, mask=line_ok)
