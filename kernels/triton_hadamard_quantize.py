"""Fused block-Hadamard rotation + FP8/INT8 quantization in one Triton kernel.

`hadamard_quantize(x, fmt, granularity, block, dim)` computes what the plain-torch composition

    quantize(block_hadamard(x, block, dim=dim) if block else x.float(), fmt, granularity)

computes (see hadamard.py, quantize.py), reading the bf16/fp16/fp32 input from memory and
writing the FP8 E4M3 / INT8 values (contiguous, x's shape) and the float32 scales (one per row
of x, or one), with no rotated copy in between. The layouts the three matmuls of a linear need:
* dim=1 on a row-major operand (forward X and W, grad-input dY with "inner");
* dim=1 on a transposed view (grad-weight's dYᵀ and Xᵀ, and grad-input's Wᵀ): the kernel reads
  the strided view in place, coalesced along its lines, and writes the contiguous transpose, so
  there is no separate transposing pass;
* dim=0 (the "outer" rotation of HALO-2's grad-input: H along the tokens, scales still per row);
* both at once, dual (`halo::hadamard_quantize_dual`): dY [tokens, features] for grad-input
  (dim=0) and dYᵀ for grad-weight, rotated along the same tokens, from the same tiles: dim 0's
  two launches also keep each feature's absmax and store the transpose, so dY is read and
  rotated twice for both instead of twice for each.

Design
------
* The kernel sees M lines of K values through strides (x[m, k] at x + m * sxm + k * sxk) and
  rotates along K. dim=0 runs it on the transposed views of x and of the output, with the
  scales attached to K indices instead of lines (SCALE_PER_K).
* Grid, scales per line: (line blocks of BLOCK_M, splits of K). A program loops over its K range
  twice; one iteration handles NT tiles of 256 K indices per line, i.e. a batch of BLOCK_M * NT
  tiles viewed as [16, 16] (k = k0 + 256 * t + 16 * mid + low). With one split and per-line
  scales (granularity "row", dim=1) one launch does it all: the first loop rotates every tile
  and keeps an elementwise running absmax of the tiles (NaN-propagating max; reduced across
  lanes once, after the loop, not per iteration); the second rotates the same tiles again,
  backwards (loaded with evict_last in the first loop; the tiles loaded last are the likeliest
  to be still in L2), divides by the scale and stores. When BLOCK_M divides M and NT * 256
  divides K the tiles are loaded and stored unmasked (EVEN).
  Otherwise (K split over programs because there are few line blocks, scales per K index, or
  granularity "tensor") a first launch stores each program's absmax of each of its scales (a
  row of partials per split: no atomics, no buffer to zero) and a second launch quantizes; it
  takes the max over the splits and computes the scales itself, exactly as the reference does,
  and stores them (with granularity "tensor", torch reduces the partials to the one scale).
* Grid, scales per K index (dim 0): (K tiles of 256, splits of the lines). A program owns 256 K
  indices (tokens) and loops over its range of lines (features) BLOCK_M at a time, so the
  absmax of each of its K indices stays in registers (an elementwise running max, as above);
  its partial absmaxes stored at the end, then the quantize launch, which computes its 256
  scales once. (Against a loop along K with an atomic max per iteration, BLOCK_M 64 is
  36-47% faster this way, measured on an H200.)
  GPU launches (BLOCK_M, NT, warps; GPU_CONFIGS, measured per layout): rows (1, 2, 2) (one
  warp per 16 x 16 tile), (1, 4, 4) unrotated; transposed views (16, 1, 4) rotated, K split
  until ~4 programs per SM; dim 0 (64, 1, 4), lines split until ~2 programs per SM.
* A strided view without rotation (grad-weight's dYᵀ and Xᵀ with HALO-2, grad-input's Wᵀ with
  an "outer" or no rotation: half of a decoder layer's quantize time) has a kernel of its own,
  `_transpose_quantize_kernel`: plain [BLOCK_K, BLOCK_M] tiles loaded along the lines and
  stored along K, an absmax launch (a row of partials per K split) then a quantize launch of
  shorter programs (TRANSPOSE_CONFIG), none of the [16, 16] batching the rotation needs: 46%
  of copy bandwidth at a decoder layer's shapes against 35% through the main kernel (measured
  on an H200).
* The rotation is two batched `tl.dot`s with 16 x 16 Hadamard blocks instead of one dot with the
  block x block matrix: Sylvester matrices factor as H_(16r) = H_r (x) H_16, so inside a 256-wide
  tile the block transform is X -> G X H_16, H_16 acting on `low` (a right product) and
  G = I_(16/r) (x) H_r (r = block / 16) on `mid` (a left product; skipped for block 16). That is
  64 flops per element for any block up to 256 instead of 2 * block, and a 16 x 16 operand
  instead of a 256 x 256 one (128 KiB in bf16, more shared memory than a program can afford).
  G X comes first, with the loaded tile as the B operand; its float32 accumulator is then the A
  operand of the product with H_16, a conversion that stays in registers. Both matrices hold
  only +-1 and 0 and are built in registers from the bit pattern (H[u, v] = (-1)^popcount(u & v));
  the 1/sqrt(block) factor is applied afterwards in float32, the way the reference applies it;
  for blocks 16, 64 and 256 it is a power of two, so it is folded into the absmax and the scale
  instead (y / sqrt(block) / scale = y / (scale * sqrt(block)), exactly), one multiply less.
* Precision: every product of a dot is exact (+-1 or 0 times a value representable in the
  operand type) and the accumulation is float32, so the rotation differs from the reference FWHT
  only in the order of float32 additions. bf16/fp16 inputs are dot operands as they are. Values
  that are genuinely float32 (fp32 inputs; the intermediate after the first dot) are split into
  three bf16 pieces hi + mid + lo (exact for normal floats: 3 x 8 significant bits; hi and mid
  are the float32 truncated to its top 16 bits, which is a bf16, so no rounding is needed) that go
  through three bf16 dots accumulating into one float32 result (`precision="split"`, the
  default; `_pm1_dot`), or through one float32 dot with input_precision="ieee"
  (`precision="ieee"`: CUDA cores, half the bandwidth on an H100, and no more accurate).
  Rounding the intermediate to bf16 instead (one dot, no split) measured 28-35% faster on rows
  and 27-35% slower on dim 0, for 0-0.8% more FP8 error against float64 (0-10% INT8): not used
  (docs/BENCHMARKS.md), nor is laying the tiles out for 2-D dots (2.4-3x
  slower than the batched ones).
* Dual (DUAL, on dim 0's launches): a program's tile is 256 tokens x BLOCK_M features, so the
  first launch also reduces each feature's absmax over its 256 tokens (a partial per K tile,
  reduced by torch between the launches), and the second quantizes the tile twice, per token
  into q and per feature into the transpose qt ([features, tokens], contiguous: Triton stages
  the tile through shared memory for a store coalesced along the tokens). At BLOCK_M 32 that
  is 444 µs for dY [8192, 14336] on an H200, against 533 for the two quantizations apart. A dual
  whose transpose is not rotated (HALO-2's grad-weight) measured 2.2x slower than apart (the
  loaded tile's own absmax and quantization beside the rotated one's: 255 registers, twice
  the SASS per iteration; docs/BENCHMARKS.md), so with grad-weight "none" dYᵀ
  is quantized on its own.
* Quantization, exactly as torch computes the reference on the same device: the scale is
  max(amax, 1e-12) / max_value on the CPU, and amax * float32(1 / max_value) on CUDA (torch
  divides by a Python scalar that way there); q = RN(y / scale), computed as
  RN(y * inv) + one FMA correction with inv = RN(1 / scale) (Markstein), which equals IEEE
  division except for subnormal |y|, whose quotient quantizes to zero either way, and costs
  less than div.rn.f32; INT8 rounds half to even (the 1.5 * 2^23 trick); FP8 converts with
  round-to-nearest-even and saturates (cvt.rn.satfinite), so it needs no clamp to +-448 (the
  integer FP8 conversion and INT8 do clamp). NaN and inf make the row's absmax inf, so the scale
  is non-finite exactly when the reference's is (the values are then meaningless).
* Stochastic rounding (STOCHASTIC; grad_rounding="stochastic"): in the store, the exact
  quotient gets 20 random bits below E4M3's 3 kept mantissa bits and is truncated (INT8:
  floor(v + u)), as quantize.py's reference rounds; the bits are a counter-based hash of each
  element's index in the output (`_random_bits`), keyed by seeds drawn from torch's generator
  per launch (DUAL's transpose by a second seed). Scales are unchanged; only the values'
  rounding differs.
* The FP8 output is stored through its own float8 pointer (the integer-built E4M3 bits are
  bitcast to float8e4nv), so Inductor's wrapper passes the tensor as it is, with no dtype view
  per launch.

Accuracy (tests/kernels/test_triton_hadamard_quantize.py, on the device): with block 0 the
output equals the reference bit for bit. With a rotation the scales agree to 1e-6 relative and
values differ by at most one quantum, in at most 1 in 10^4 at Llama shapes on the GPU (1 in
1000 at the interpreter's small shapes). Counted on an H100 with the earlier, rounded splits: 4
to 83 of 33.5M / 117M bf16 values at block 256, scales within 4e-7.

Bandwidth (H100, 2026-12-07, docs/BENCHMARKS.md), bytes read once + written once, CUDA graph
timing, bf16 -> FP8 per row, block 256, against a 2.9-3.0 TB/s copy, at 8192 x 4096 and
8192 x 14336: rows 1.77-1.82 TB/s (61%; block 0: 2.13-2.66 TB/s, 71-91%), transposed view
1.15-1.26 TB/s (block 0, its own kernel: 1.62-1.69, 54-58%), dim 0 1.17-1.34 TB/s (40-45%).
The rotated rows kernel is bound by instruction issue (Nsight Compute: issue slots 77% busy before
the changes above, which cut its two loop bodies from 339 to 245 SASS instructions, 8 values per
thread, as Triton 3.9 compiles them for sm_90; benchmarks/kernel_resources.py counts them): the
three bf16 pieces of the intermediate and their dots, the rotation done twice (once per pass), the
division. The strided variants read their input twice (two launches: at most 3/5 of copy
bandwidth when the second read comes from memory) and are bound by occupancy (dim 0 at BLOCK_M
64: 228-255 registers and 96-104 KiB of shared memory per program, two programs per SM, as
benchmarks/kernel_resources.py reports).

Triton interpreter (CPU tensors): `hadamard_quantize_triton` runs the same kernel through the
interpreter whenever its input is on the CPU (triton_interpreter.py says how). Under the
interpreter (triton 3.9) two things are wrong and
are worked around: a `tl.dot` of bfloat16 operands multiplies the raw uint16 bit patterns, so
the dot operands are converted to float32 first (the products are exact either way, so this is
the same arithmetic); and the float32 -> float8e4nv cast rounds wrongly when rounding carries into
the exponent (e.g. -1.947 -> -1.0), so the E4M3 bits are computed with integer operations
(`soft_fp8`, also available on the GPU). Storing float8 or uint8 works.

`halo::hadamard_quantize` is a `torch.library.triton_op`: on CUDA it launches the kernel (and
Inductor sees the kernel), on other devices it runs the reference; its fake implementation is
the same function run on fake tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .constants import FORMATS, MAX_BLOCK, ROUNDINGS
from .constants import MIN_AMAX as _MIN_AMAX
from .hadamard import block_hadamard
from .quantize import quantize
from .triton_interpreter import interpreted

PRECISIONS = ("split", "ieee")

# Kernel modes.
_ROW = 0  # both loops: per-row absmax, per-row scale, quantize
_AMAX_ONLY = 1  # first loop only: each program's absmax per scale, one row per split
_WITH_SCALE = 2  # second loop only: quantize, the scales computed from a first launch's absmax
# (SCALE_VEC: per line / K index, the max over amax_ptr's splits; else one, at scale_ptr[0])


# tl.max, tl.zeros & co. are @triton.jit functions of triton.language.standard; an
# InterpretedFunction built without TRITON_INTERPRET cannot call them, but tl.reduce with
# tl.standard._elementwise_max is patched by the interpreter (a numpy fast path) and compiles on
# the GPU. (Spelled out in the kernel: Inductor, which re-emits the kernel's source for a compiled
# graph, does not carry module-level aliases along.) The kernel's own helpers are @triton.jit
# functions: Inductor re-emits them with the kernel, and the interpreter wrapper
# (triton_interpreter.py) interprets them with it.


@triton.jit
def _scale_of(amax, RECIP_SCALE: tl.constexpr, MAX_VALUE: tl.constexpr,
              INV_MAX_VALUE: tl.constexpr):
    """The scale of an absmax, as torch computes max(amax, 1e-12) / MAX_VALUE: on CUDA as
    amax * float32(1 / MAX_VALUE) (RECIP_SCALE), on the CPU correctly rounded."""
    if RECIP_SCALE:
        scale = tl.maximum(amax, 1e-12) * INV_MAX_VALUE
    else:
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), MAX_VALUE)
    return scale


@triton.jit
def _divisor_of(scale, INV_SQRT: tl.constexpr, POW2_NORM: tl.constexpr):
    """What the rotated values are divided by, and its reciprocal RN(1 / divisor): the scale,
    or with POW2_NORM the scale times sqrt(HB) (y / sqrt(HB) / scale as y / (scale * sqrt(HB)):
    exact for a power of two)."""
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, dtype=tl.float32), scale)
    if POW2_NORM:
        scale = scale * (1.0 / INV_SQRT)
        inv = inv * INV_SQRT
    return scale, inv


@triton.jit
def _max_over_splits(amax_ptr, idx, ok, n_scales, n_split, SPLITS: tl.constexpr):
    """The absmax of scales `idx` (1-D): the max of the first launch's partial absmaxes, one
    row of n_scales per split (NaN already made inf)."""
    s = tl.arange(0, SPLITS)
    parts = tl.load(amax_ptr + s[:, None] * n_scales + idx[None, :],
                    mask=(s[:, None] < n_split) & ok[None, :], other=0.0)
    return tl.reduce(parts, 0, tl.standard._elementwise_max)


@triton.jit
def _pm1_product(u, pm1, acc, U_ON_LEFT: tl.constexpr):
    if U_ON_LEFT:
        out = tl.dot(u, pm1, acc, input_precision="ieee")
    else:
        out = tl.dot(pm1, u, acc, input_precision="ieee")
    return out


@triton.jit
def _pm1_dot(u, pm1, U_ON_LEFT: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """u @ pm1 (U_ON_LEFT) or pm1 @ u in float32, where pm1 holds only +-1 and 0, so every
    product is exact. With SPLIT the float32 u goes in as three bf16 pieces hi + mid + lo == u
    (hi and mid are float32s truncated to their top 16 bits, which are bf16s: no rounding), one
    dot each, smallest first, accumulated in float32; else u is a dot operand as it is. UPCAST
    (the interpreter, whose bf16 dot is broken): the operands in float32."""
    if SPLIT:
        hi = (u.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
        rest = u - hi
        mid = (rest.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
        lo = (rest - mid).to(tl.bfloat16)
        hi = hi.to(tl.bfloat16)
        mid = mid.to(tl.bfloat16)
        if UPCAST:
            hi = hi.to(tl.float32)
            mid = mid.to(tl.float32)
            lo = lo.to(tl.float32)
        acc = _pm1_product(lo, pm1, None, U_ON_LEFT)
        acc = _pm1_product(mid, pm1, acc, U_ON_LEFT)
        acc = _pm1_product(hi, pm1, acc, U_ON_LEFT)
    else:
        if UPCAST:
            u = u.to(tl.float32)
        acc = _pm1_product(u, pm1, None, U_ON_LEFT)
    return acc


@triton.jit
def _mixed(x):
    """A bijective 32-bit integer hash with strong avalanche ("lowbias32", C. Wellons' hash
    prospector): nearby inputs give unrelated outputs."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _random_bits(seed_ptr, which: tl.constexpr, offsets):
    """32 random bits per element of `offsets` (unique element indices): a counter-based hash
    of the index and the launch's seed `which` (0: q, 1: DUAL's qt). Not Philox (tl.randint,
    Inductor's generator): its 10 rounds on 6 live words per value made the kernels 3x slower
    on rows and 43x on dim 0 (128 values a thread there, spilled; H100, docs/BENCHMARKS.md),
    where this costs 7 integer operations on one word. Indices wrap at 2^32."""
    key = _mixed(tl.load(seed_ptr + which).to(tl.uint32))
    return _mixed(offsets.to(tl.uint32) + key)


@triton.jit
def _stochastically_rounded(val, bits, INT8: tl.constexpr):
    """`val` rounded up or down to a neighbour in the format's grid, up with probability equal
    to its distance from the lower one (unbiased), as quantize.py's reference rounds: INT8 as
    floor(val + u), u uniform in [0, 1) from the top 24 bits; FP8 E4M3 by adding 20 random
    bits below its 3 kept mantissa bits of the float32 and truncating (in sign-magnitude
    encoding that rounds the magnitude; E4M3's subnormals are then rounded to nearest by the
    conversion, as in the reference)."""
    if INT8:
        val = tl.floor(val + (bits >> 8).to(tl.float32) * (1.0 / 16777216.0))
    else:
        noisy = val.to(tl.int32, bitcast=True) + (bits & 0xFFFFF).to(tl.int32)
        val = (noisy & -1048576).to(tl.float32, bitcast=True)
    return val


@triton.jit
def _quantized(y, divisor, inv, EXACT_DIV: tl.constexpr, INT8: tl.constexpr,
               SOFT_FP8: tl.constexpr, MAX_VALUE: tl.constexpr, bits,
               STOCHASTIC: tl.constexpr):
    """y / divisor (inv = RN(1 / divisor)) rounded to INT8 or FP8 E4M3: to nearest, or with
    STOCHASTIC up or down at random (`bits`: 32 random bits per element)."""
    if EXACT_DIV:
        # y / divisor correctly rounded (Markstein: with inv = RN(1 / divisor), one FMA
        # correction of RN(y * inv) gives RN(y / divisor); only for |y| in the subnormal range
        # can it differ, and such values quantize to zero anyway). Cheaper than div.rn.f32.
        val = y * inv
        res = tl.fma(-val, divisor, y)  # exact residual
        val = tl.where(res == 0.0, val, tl.fma(res, inv, val))  # keeps -0.0
    else:
        val = y * inv
    if STOCHASTIC:  # then the conversions below are exact (normal FP8 values, integers)
        val = _stochastically_rounded(val, bits, INT8)
    if INT8 or SOFT_FP8:  # (the hardware FP8 conversion saturates by itself)
        val = tl.minimum(tl.maximum(val, -MAX_VALUE), MAX_VALUE)
    if INT8:
        q = ((val + 12582912.0) - 12582912.0).to(tl.int8)  # round half to even
    elif SOFT_FP8:
        mag = tl.abs(val)
        bits = mag.to(tl.int32, bitcast=True)
        rb = bits + 0x7FFFF + ((bits >> 20) & 1)  # round to 3 mantissa bits, RNE
        normal = (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7)
        sub = ((mag * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # k * 2^-9
        code = tl.where(mag < 0.015625, sub, normal)
        sign = (val.to(tl.int32, bitcast=True) >> 24) & 0x80
        q = (code | sign).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        q = val.to(tl.float8e4nv)
    return q


@triton.jit
def _line_absmax(t):
    """The absmax of each line of a [lines, 16, 16] batch of tiles, NaN made inf."""
    a = tl.abs(t)
    a = tl.where(a == a, a, float("inf"))
    a = tl.reduce(a, 2, tl.standard._elementwise_max)
    return tl.reduce(a, 1, tl.standard._elementwise_max)


@triton.jit
def _store_transposed(t, qt_at, mask, lines, amax_t_ptr, scale_t_ptr, store_scales, M,
                      EVEN: tl.constexpr, RECIP_SCALE: tl.constexpr, MAX_VALUE: tl.constexpr,
                      INV_MAX_VALUE: tl.constexpr, INV_SQRT: tl.constexpr,
                      POW2_NORM: tl.constexpr, EXACT_DIV: tl.constexpr, INT8: tl.constexpr,
                      SOFT_FP8: tl.constexpr, bits, STOCHASTIC: tl.constexpr):
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
    q = _quantized(t, divisor[:, None, None], inv[:, None, None], EXACT_DIV, INT8, SOFT_FP8,
                   MAX_VALUE, bits, STOCHASTIC)
    tl.store(qt_at, q, mask=mask)


def _hadamard_quantize_kernel(
    x_ptr, q_ptr, scale_ptr,
    amax_ptr,  # _AMAX_ONLY / _WITH_SCALE: partial absmaxes [splits, scales], float32
    # DUAL: the transpose's values [M, K] contiguous and scales [M] (one per line), and its
    # absmaxes: partials [K tiles, M] (_AMAX_ONLY), their max [M] (_WITH_SCALE)
    qt_ptr, scale_t_ptr, amax_t_ptr,
    seed_ptr,  # STOCHASTIC: the launch's random seeds [2] (q's, DUAL's qt's), int64
    M, K, stride_xm, stride_xk, stride_qm, stride_qk,
    per_split,  # K indices per program (per line block), or lines with SCALE_PER_K
    n_split,  # programs along grid axis 1 (partial absmaxes per scale)
    HB: tl.constexpr,  # Hadamard block: 0 (no rotation) or a power of two 16..256
    INT8: tl.constexpr,  # output format: INT8 if true, else FP8 E4M3 (as raw bytes)
    MODE: tl.constexpr,  # _ROW, _AMAX_ONLY or _WITH_SCALE
    SCALE_PER_K: tl.constexpr,  # one scale per index along K (rotation "outer"; NT == 1), else
    # per line
    SCALE_VEC: tl.constexpr,  # _WITH_SCALE: scales from amax_ptr per line / K index, else one
    DUAL: tl.constexpr,  # SCALE_PER_K: also quantize with one scale per line, stored transposed
    SPLITS: tl.constexpr,  # n_split rounded up to a power of two
    X_FP32: tl.constexpr,  # the input is float32 (else bf16/fp16, exact as a dot operand)
    IEEE: tl.constexpr,  # float32 operands through an "ieee" dot instead of a 3 x bf16 split
    UPCAST_DOT: tl.constexpr,  # interpreter: all dot operands in float32
    SOFT_FP8: tl.constexpr,  # compute the E4M3 bits with integer operations
    MAX_VALUE: tl.constexpr,
    INV_MAX_VALUE: tl.constexpr,  # float32(1 / MAX_VALUE)
    RECIP_SCALE: tl.constexpr,  # scale = amax * INV_MAX_VALUE (else amax / MAX_VALUE)
    INV_SQRT: tl.constexpr,
    POW2_NORM: tl.constexpr,  # INV_SQRT is a power of two (blocks 16, 64, 256): scale the scales
    R: tl.constexpr,  # HB // 16 (1 when HB is 0 or 16): G = I (x) H_R
    FIRST_PASS: tl.constexpr,  # passes FIRST_PASS..LAST_PASS-1 run: 0 = absmax, 1 = quantize
    LAST_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NT: tl.constexpr,  # 256-column tiles per line and loop iteration
    NB: tl.constexpr,  # BLOCK_M * NT
    EXACT_DIV: tl.constexpr,  # IEEE division by the scale (else multiply by its reciprocal)
    INT64: tl.constexpr,  # element offsets need 64 bits
    EVEN: tl.constexpr,  # BLOCK_M divides M and NT * 256 divides K: no masks
    STOCHASTIC: tl.constexpr,  # stochastic rounding (else to nearest)
):
    # The input is addressed through strides as M lines of K values: x[m, k] at
    # x_ptr + m * stride_xm + k * stride_xk, so a transposed view (stride_xm == 1) is read in
    # place, coalesced along the lines, and written contiguously along K: the transpose the
    # grad-weight matmul needs costs no pass of its own. The rotation is along K.
    # The work of one iteration is a batch of NB = BLOCK_M * NT tiles of [16, 16]: batch entry
    # b holds line m0 + b // NT, K indices k0 + 256 * (b % NT) + 16 * mid + low (m0, k0: the
    # iteration's first line and K index).
    # Scales per line: program (a, s) owns lines a * BLOCK_M ... and loops along K over split s
    # (K indices s * per_split ...), so each line's absmax stays in registers.
    # Scales per K index (SCALE_PER_K, NT == 1): program (a, s) owns the 256 K indices
    # a * 256 ... and loops over split s of the lines (lines s * per_split ...), so each K
    # index's absmax stays in registers; each program stores its partial absmaxes at the end.
    pid_a = tl.program_id(0)
    pid_s = tl.program_id(1)
    start = pid_s * per_split
    b = tl.arange(0, NB)
    i16 = tl.arange(0, 16)
    k16 = i16[:, None] * 16 + i16[None, :]
    if SCALE_PER_K:
        end = tl.minimum(M, start + per_split)
        step = BLOCK_M
        k_base = pid_a * 256
        k_ok = k_base + k16 < K
        line_of_b = b[:, None, None]  # + m0
        k_of_b = k_base + k16[None, :, :]
    else:
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
    q_tiles = q_ptr + line_of_b * stride_qm + k_of_b * stride_qk
    qt_tiles = qt_ptr + line_of_b * K + k_of_b  # (DUAL)

    # +-1 Hadamard H_16 (acts on `low`) and G = I (x) H_R (acts on `mid`), R = HB / 16.
    hu = i16[:, None]
    hv = i16[None, :]
    par = hu & hv
    par = par ^ (par >> 2)
    par = (par ^ (par >> 1)) & 1
    h16 = (1 - 2 * par).to(tl.float32)
    gpar = hu & hv & (R - 1)
    gpar = gpar ^ (gpar >> 2)
    gpar = (gpar ^ (gpar >> 1)) & 1
    g = tl.where((hu // R) == (hv // R), 1 - 2 * gpar, 0).to(tl.float32)
    h16_f = tl.broadcast_to(h16[None, :, :], (NB, 16, 16))
    g_f = tl.broadcast_to(g[None, :, :], (NB, 16, 16))
    # Dot operands: bf16 for the pieces of float32 values, the input's type for the input itself;
    # float32 everywhere under the interpreter (its bf16 dot is broken) or with IEEE.
    if UPCAST_DOT or IEEE:
        h16_op = h16_f
        g_op = g_f
    else:
        h16_op = h16_f.to(tl.bfloat16)
        g_op = g_f.to(tl.bfloat16)
    if UPCAST_DOT or X_FP32:  # float32 inputs: the same operands as their pieces
        h16_xop = h16_op
        g_xop = g_op
    else:
        h16_xop = h16_f.to(x_ptr.dtype.element_ty)
        g_xop = g_f.to(x_ptr.dtype.element_ty)

    amax_b = tl.full([NB], 0.0, dtype=tl.float32)  # (defined for the second pass's scope)
    # Elementwise running absmax of the tiles, reduced across lanes once after the loop.
    amax_tiles = tl.full([NB, 16, 16], 0.0, dtype=tl.float32)
    for p in tl.static_range(FIRST_PASS, LAST_PASS):
        if p == 1:
            if SCALE_PER_K and SCALE_VEC:  # this program's K indices' scales
                k256 = k_base + tl.arange(0, 256)
                amax_k = _max_over_splits(amax_ptr, k256, k256 < K, K, n_split, SPLITS)
                amax_k = tl.reshape(amax_k, (16, 16))  # as k16
                scale_k = _scale_of(amax_k, RECIP_SCALE, MAX_VALUE, INV_MAX_VALUE)
                if pid_s == 0:  # (one program per K tile stores them)
                    tl.store(scale_ptr + k_base + k16, scale_k, mask=k_ok)
                divisor, inv = _divisor_of(scale_k, INV_SQRT, POW2_NORM)
                scale3 = divisor[None, :, :]
                inv3 = inv[None, :, :]
            else:
                if MODE == 0 or SCALE_VEC:  # per line
                    if MODE == 0:
                        amax = tl.reshape(amax_b, (BLOCK_M, NT))
                        amax = tl.reduce(amax, 1, tl.standard._elementwise_max)
                    else:  # each line's absmax, from the first launch
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
                # (Between the two launches of the other modes, reversing the second launch's
                # programs and loops measured no faster: docs/BENCHMARKS.md.)
                o = start + (n_iter - 1 - i) * step
            else:
                o = start + i * step
            if INT64:
                o_at = o.to(tl.int64)
            else:
                o_at = o
            if SCALE_PER_K:  # o is the first line of the iteration
                x_at = x_tiles + o_at * stride_xm
                q_at = q_tiles + o_at * stride_qm
                if EVEN:
                    mask = None
                else:
                    mask = ((o + b) < M)[:, None, None] & k_ok[None, :, :]
            else:  # o is the first K index of the iteration
                x_at = x_tiles + o_at * stride_xk
                q_at = q_tiles + o_at * stride_qk
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
            # ---- rotate: y = G X H_16 / sqrt(HB), float32 ----
            # First G X (a left product: the loaded tile is the B operand), then (G X) H_16 (a
            # right product: the accumulator of the first dot becomes the A operand of the
            # second, a conversion that stays in registers). Skipped products are identities.
            if HB == 0:
                y = x.to(tl.float32)
            else:
                if R == 1:
                    v = x
                else:  # G X: the loaded tile is the right operand
                    v = _pm1_dot(x, g_xop, False, X_FP32 and not IEEE, UPCAST_DOT)
                # (G X) H_16: the accumulator of the first dot is the left operand
                if R == 1 and not X_FP32:  # v is the input: exact as an operand
                    y = _pm1_dot(v, h16_xop, True, False, UPCAST_DOT)
                else:  # v is float32
                    y = _pm1_dot(v, h16_op, True, not IEEE, UPCAST_DOT)
                if not POW2_NORM:  # else folded into the scales (exact for a power of two)
                    y = y * INV_SQRT
            if p == 0:
                amax_tiles = tl.maximum(amax_tiles, tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
                if DUAL:  # each line's absmax over this program's 256 K indices
                    a_line = _line_absmax(y)
                    if POW2_NORM:
                        a_line = a_line * INV_SQRT
                    tl.store(amax_t_ptr + pid_a * M + o + b, a_line, mask=(o + b) < M)
            else:
                bits = None
                if STOCHASTIC:  # each element's own numbers, from its index (computed here:
                    # a tile of indices kept live across the loop would cost registers)
                    if SCALE_PER_K:
                        at = (line_of_b + o_at) * K + k_of_b
                    else:
                        at = line_of_b * K + k_of_b + o_at
                    bits = _random_bits(seed_ptr, 0, at)
                q = _quantized(y, scale3, inv3, EXACT_DIV, INT8, SOFT_FP8, MAX_VALUE, bits,
                               STOCHASTIC)
                tl.store(q_at, q, mask=mask)
                if DUAL:  # the same tile, scaled per line, stored transposed
                    if STOCHASTIC:
                        bits = _random_bits(seed_ptr, 1, at)
                    _store_transposed(y, qt_tiles + o_at * K, mask, o + b, amax_t_ptr,
                                      scale_t_ptr, pid_a == 0, M, EVEN, RECIP_SCALE, MAX_VALUE,
                                      INV_MAX_VALUE, INV_SQRT, POW2_NORM, EXACT_DIV, INT8,
                                      SOFT_FP8, bits, STOCHASTIC)
        if p == 0:
            amax_tiles = tl.where(amax_tiles == amax_tiles, amax_tiles, float("inf"))  # NaN
            if SCALE_PER_K:  # other programs cover other lines: partials, one row per split
                amax_k = tl.reduce(amax_tiles, 0, tl.standard._elementwise_max)
                if POW2_NORM:
                    amax_k = amax_k * INV_SQRT
                tl.store(amax_ptr + pid_s * K + k_base + k16, amax_k, mask=k_ok)
            else:
                amax_b = tl.reduce(amax_tiles, 2, tl.standard._elementwise_max)
                amax_b = tl.reduce(amax_b, 1, tl.standard._elementwise_max)
                if POW2_NORM:
                    amax_b = amax_b * INV_SQRT
                if MODE == 1:  # other programs may cover other K ranges
                    amax = tl.reshape(amax_b, (BLOCK_M, NT))
                    amax = tl.reduce(amax, 1, tl.standard._elementwise_max)
                    tl.store(amax_ptr + pid_s * M + rows, amax, mask=row_ok)


def _transpose_quantize_kernel(
    x_ptr, q_ptr, scale_ptr,
    amax_ptr,  # partial absmaxes [splits, M], float32
    seed_ptr,  # STOCHASTIC: the launch's random seed, int64
    M, K, stride_xm, stride_xk,
    per_split,  # K indices per program
    n_split,  # programs along K of the absmax launch (rows of partials at amax_ptr)
    INT8: tl.constexpr,
    MODE: tl.constexpr,  # _AMAX_ONLY or _WITH_SCALE
    SCALE_VEC: tl.constexpr,  # _WITH_SCALE: a scale per line from amax_ptr, else one given
    SPLITS: tl.constexpr,  # n_split rounded up to a power of two
    SOFT_FP8: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    INV_MAX_VALUE: tl.constexpr,
    RECIP_SCALE: tl.constexpr,
    EXACT_DIV: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr,  # lines per program
    BLOCK_K: tl.constexpr,  # K indices per loop iteration
    EVEN: tl.constexpr,  # BLOCK_M divides M, BLOCK_K divides per_split and K: no masks
    STOCHASTIC: tl.constexpr,  # stochastic rounding (else to nearest)
):
    # The unrotated quantization of a strided view: x[m, k] at x_ptr + m * stride_xm +
    # k * stride_xk (stride_xm 1: a [K, M] tensor seen as its transpose), q [M, K] contiguous.
    # A tile [BLOCK_K, BLOCK_M] is loaded coalesced along the lines and stored coalesced along
    # K (Triton stages it through shared memory). Without a rotation, the main kernel's [16, 16]
    # tiles and Hadamard blocks are pure overhead.
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
        if SCALE_VEC:
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
            q = _quantized(x, divisor[None, :], inv[None, :], EXACT_DIV, INT8, SOFT_FP8,
                           MAX_VALUE, bits, STOCHASTIC)
            tl.store(q_tile + k_at, q, mask=mask)
    if MODE == 1:
        amax = tl.where(amax == amax, amax, float("inf"))  # NaN
        amax = tl.reduce(amax, 0, tl.standard._elementwise_max)
        tl.store(amax_ptr + pid_k * M + lines, amax, mask=line_ok)


_JITTED = {fn: triton.jit(fn) for fn in (_hadamard_quantize_kernel, _transpose_quantize_kernel)}


# ---------------------------------------------------------------------------------------------
# Python side


def _check_args(x, fmt, granularity, block, dim=1, precision="split", rounding="nearest"):
    if x.dim() != 2:
        raise ValueError(f"hadamard_quantize takes a 2-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"hadamard_quantize: unsupported dtype {x.dtype}")
    if fmt not in FORMATS:
        raise ValueError(f"hadamard_quantize: unknown format {fmt!r}")
    if granularity not in ("row", "tensor"):
        raise ValueError(f"hadamard_quantize: unknown granularity {granularity!r}")
    if dim not in (0, 1):
        raise ValueError(f"hadamard_quantize: dim must be 0 or 1, got {dim!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"hadamard_quantize: unknown precision {precision!r}; allowed: "
                         f"{PRECISIONS}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"hadamard_quantize: unknown rounding {rounding!r}; allowed: "
                         f"{ROUNDINGS}")
    if block:
        if block < 16 or block > MAX_BLOCK or block & (block - 1):
            raise ValueError(f"hadamard_quantize: block must be 0 or a power of two in 16..256, "
                             f"got {block}")
        size = x.shape[dim]
        if isinstance(size, int) and size % block:
            raise ValueError(f"hadamard_quantize: block {block} does not divide {size}")
        torch._check(size % block == 0,
                     lambda: f"hadamard_quantize: block {block} does not divide {size}")


# GPU launch configurations, per layout and whether the kernel rotates: (BLOCK_M, NT,
# num_warps, programs per SM that splitting the loop aims for when a launch has too few
# programs; 0: no split). Measured
# on an H100 (triton 3.6, bf16 -> FP8 row scales, 8192 x 4096 and 8192 x 14336,
# benchmarks/hadamard_quantize.py --sweep):
# * rows (K contiguous): one warp per 16 x 16 tile and few tiles per program, many programs per
#   SM. Rotated: (1, 2, 2), (1, 4, 4) and (2, 2, 4) within 1% (1.52 TB/s); 8 or more tiles per
#   warp, or a whole row per program kept in registers between the passes, 1.5 to 5 times
#   slower. Not rotated: (1, 4, 4) 1.91 TB/s vs (1, 2, 2) 1.76.
# * a transposed view (lines contiguous; grad-weight's dYᵀ and Xᵀ, grad-input's Wᵀ): BLOCK_M
#   lines side by side make each load 2 * BLOCK_M contiguous bytes (bf16) per K index. Rotated:
#   BLOCK_M 16 1.12 TB/s, 32 or 64 0.74-0.90 (the ±1 blocks are broadcast over the BLOCK_M tiles
#   of a batched dot and staged in shared memory: 32 KiB each at 64). (Not rotated: a kernel
#   of its own, TRANSPOSE_CONFIG.)
# * dim 0 ("outer", a program per 256 K indices looping over a split of the lines): on an H200,
#   BLOCK_M 64 with 4 warps 1.06 / 1.33 TB/s at 8192 x 4096 / 8192 x 14336, 32 1.04 / 1.09,
#   16 0.54-0.68, 8 warps or 2 or 4 stages slower; up to 2 programs per SM (the most that fit
#   at once: one wave) 1.18 / 1.36 against 1.06 / 1.33 with ~4.
# On an H200, 8 or 16 warps and 1-2 stages lost against these for both transposed variants (+3%
# in one case, -3 to -49% elsewhere).
GPU_CONFIGS = {
    ("rows", True): (1, 2, 2, 0),
    ("rows", False): (1, 4, 4, 0),
    ("transposed", True): (16, 1, 4, 4),
    ("outer", True): (64, 1, 4, 2),
    ("outer", False): (64, 1, 4, 2),  # no matmul asks for it; as rotated
    # dim 0 with the transpose too (dual): BLOCK_M 32 (444 µs at 8192 x 14336 on an H200,
    # against 571 at 64 and 665 at 16).
    ("dual", True): (32, 1, 4, 2),
    ("dual", False): (32, 1, 4, 2),  # no matmul asks for it; as rotated
}
# A transposed view without rotation (_transpose_quantize_kernel): (BLOCK_M, BLOCK_K, num_warps,
# programs per SM the absmax launch aims for, K tiles per program of the quantize launch).
# On an H200, for a decoder layer's transposes (4096 tokens; benchmarks/hadamard_quantize.py
# --layer halo2 --sweep): BLOCK_K 128 25 / 85 µs at 4096 x 4096 / 14336 x 4096, against 29 / 93
# at BLOCK_K 64; BLOCK_M 32 wins by 1-2 µs on 1024-line views only.
TRANSPOSE_CONFIG = (64, 128, 4, 4, 4)
# The interpreter takes bigger batches (fewer numpy calls) and uses both BLOCK_M > 1 and NT > 1
# so that the tests cover both kinds of masking.
INTERPRETER_CONFIG = (32, 2, None)
INTERPRETER_STRIDED_CONFIG = (8, 1, None)
INTERPRETER_TRANSPOSE_CONFIG = (8, 16, None, 0, 2)


# float32(1 / max_value), rounded once, as torch computes the reciprocal on CUDA. Computed here,
# at import, because under FakeTensorMode (torch.compile) a tensor's value cannot be read.
_INV_MAX_VALUE = {
    name: (torch.ones((), dtype=torch.float32) / spec.max_value).item()
    for name, spec in FORMATS.items()
}


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_grid(M, K, block_m, nt, per_k, split=None, want=0, k_tile=256):
    """(grid, per_split) of a launch over M lines of K values: programs (a, s), a along the
    lines (blocks of block_m) with the loop along K (tiles of nt * k_tile), or with per-K scales
    (per_k) a along K (tiles of k_tile) with the loop along the lines; s splits the loop, into
    `split` parts, or when there are fewer than want / 2 programs into as many as keep the
    launch at no more than `want` programs (at 2 per SM, a 289th program on 132 SMs is a second
    wave: 40% slower). per_split: the loop extent (K indices, or lines) of one split."""
    line_blocks = triton.cdiv(M, block_m)
    k_tiles = triton.cdiv(K, nt * k_tile)
    programs, loop_units, unit = ((k_tiles, line_blocks, block_m) if per_k
                                  else (line_blocks, k_tiles, nt * k_tile))
    if split is None:
        # Too few programs: a transposed [out, T] view has only out / BLOCK_M, dim 0 T / 256.
        # (A symbolic token count: chosen for the count traced, a choice of speed only.)
        programs_now = size_hint(programs)
        split = want // programs_now if programs_now < want // 2 else 1
    if not isinstance(loop_units, int):
        # A symbolic extent: `split` programs, any trailing ones with nothing to do, so that
        # the grid's split (a constexpr of the kernel) does not depend on the token count.
        return (programs, max(1, split)), triton.cdiv(loop_units, max(1, split)) * unit
    split = max(1, min(split, loop_units))
    per_split = triton.cdiv(loop_units, split) * unit
    return (programs, triton.cdiv(loop_units, per_split // unit)), per_split


def size_hint(size) -> int:
    """`size` as an int: itself, or for a symbolic size the value it has in the trace (read
    without a guard: only for choices of speed, never of results)."""
    if isinstance(size, int):
        return size
    from torch.fx.experimental.symbolic_shapes import hint_int

    return hint_int(size)


def aligned(size, multiple: int) -> bool:
    """Whether `size` is a multiple of `multiple` for every value it can take (a symbolic size
    that is not provably one counts as unaligned: masked, never a guard on its value)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(size % multiple == 0)


def _second_launch_scale(amax, granularity, spec):
    """The scales of a two-launch quantization, given the first launch's partial absmaxes
    [splits, lines]: with row scales an empty [lines, 1] that the second launch fills (it
    computes them from the partials, as the reference does); with a tensor scale, that scale."""
    if granularity == "row":
        return torch.empty((amax.shape[1], 1), dtype=torch.float32, device=amax.device)
    return (amax.amax().clamp_min(_MIN_AMAX) / spec.max_value).reshape(1, 1)


def _launch_seeds(x, rounding):
    """The seeds of a launch's random numbers ([2], int64: q's, DUAL's qt's), drawn from torch's
    generator (so torch.manual_seed makes a quantization repeatable, and a compiled graph draws
    them as Inductor draws its own); with rounding to nearest none are read: a placeholder."""
    if rounding == "stochastic":
        return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=x.device)
    return x


def _hadamard_quantize_impl(launchable, x, fmt, granularity, block, dim=1, precision="split",
                            soft_fp8=None, interpret=False, block_m=None, num_warps=None,
                            nt=None, split=None, exact_div=True, recip_scale=None,
                            num_stages=None, dual=False, block_k=None, tiles=None,
                            rounding="nearest"):
    """`launchable(kernel_fn)`: what launches a kernel function here (its @triton.jit
    compilation, wrapped for a triton_op, or interpreted)."""
    _check_args(x, fmt, granularity, block, dim, precision, rounding)
    if dual and (dim != 0 or granularity != "row"):
        raise ValueError("hadamard_quantize: the dual output needs dim 0 and row scales")
    torch._check(x.numel() >= 1, lambda: "hadamard_quantize: empty input")
    spec = FORMATS[fmt]
    q = torch.empty(x.shape, dtype=spec.dtype, device=x.device)
    # The kernel rotates along its K axis: dim 1 as given, dim 0 through the transposed views.
    xv, qv = (x.t(), q.t()) if dim == 0 else (x, q)
    M, K = xv.shape
    per_k = dim == 0  # scales per row of x = per K index of the views
    strided = xv.stride(1) != 1
    if soft_fp8 is None:
        soft_fp8 = interpret
    if recip_scale is None:
        recip_scale = not interpret
    seeds = _launch_seeds(x, rounding)
    if strided and not block and not per_k:
        return _quantize_transposed(launchable(_transpose_quantize_kernel), xv, q, fmt,
                                    granularity, interpret, soft_fp8, recip_scale, exact_div,
                                    block_m, block_k, num_warps, split, tiles, num_stages, seeds,
                                    rounding == "stochastic")
    kernel = launchable(_hadamard_quantize_kernel)
    if interpret:
        config = INTERPRETER_STRIDED_CONFIG if strided or per_k else INTERPRETER_CONFIG
        programs_per_sm = 0
    else:
        layout = "dual" if dual else "outer" if per_k else "transposed" if strided else "rows"
        *config, programs_per_sm = GPU_CONFIGS[layout, block > 0]
    bm = block_m or config[0]
    nt = 1 if per_k else (nt or config[1])
    want = programs_per_sm * _sm_count(x.device) if programs_per_sm and split is None else 0
    grid, per_split = launch_grid(M, K, bm, nt, per_k, split, want)
    extent = max((M - 1) * abs(xv.stride(0)) + (K - 1) * abs(xv.stride(1)), q.numel()) + 1
    kwargs = {} if interpret else {"num_warps": num_warps or config[2]}
    if not interpret and num_stages:  # else Triton's default software pipelining
        kwargs["num_stages"] = num_stages

    def launch(mode, scale, amax, scale_vec, qt=q, scale_t=q, amax_t=q):
        kernel[grid](
            xv, qv, scale, amax, qt, scale_t, amax_t, seeds, M, K, xv.stride(0), xv.stride(1),
            qv.stride(0), qv.stride(1), per_split, grid[1], HB=block, INT8=fmt == "int8",
            MODE=mode, SCALE_PER_K=per_k, SCALE_VEC=scale_vec, DUAL=dual,
            SPLITS=triton.next_power_of_2(grid[1]),
            X_FP32=x.dtype == torch.float32, IEEE=precision == "ieee",
            UPCAST_DOT=interpret, SOFT_FP8=soft_fp8, MAX_VALUE=spec.max_value,
            INV_MAX_VALUE=_INV_MAX_VALUE[fmt],
            RECIP_SCALE=recip_scale, INV_SQRT=1.0 / math.sqrt(block) if block else 1.0,
            POW2_NORM=block in (16, 64, 256), R=max(block // 16, 1),
            FIRST_PASS=1 if mode == _WITH_SCALE else 0,
            LAST_PASS=1 if mode == _AMAX_ONLY else 2, BLOCK_M=bm, NT=nt, NB=bm * nt,
            EXACT_DIV=exact_div, INT64=extent >= 2**31,
            EVEN=aligned(M, bm) and aligned(K, nt * 256), STOCHASTIC=rounding == "stochastic",
            **kwargs,
        )

    rows = x.shape[0]
    if granularity == "row" and not per_k and grid[1] == 1:
        # One launch: each program owns whole lines, absmax then quantize (re-read from L2).
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        launch(_ROW, scale, scale, False)
        return q, scale
    # Two launches: each program's absmax of each of its scales' groups (a row of partials per
    # split: nothing to zero, no atomics), then quantize, with the scales computed from their
    # maxima exactly as the reference computes them.
    amax = torch.empty((grid[1], rows), dtype=torch.float32, device=x.device)
    if dual:  # the transpose, quantized per line of the views: its partials per K tile
        qt = torch.empty((M, K), dtype=spec.dtype, device=x.device)
        scale_t = torch.empty((M, 1), dtype=torch.float32, device=x.device)
        amax_t = torch.empty((grid[0], M), dtype=torch.float32, device=x.device)
        launch(_AMAX_ONLY, amax, amax, False, qt, scale_t, amax_t)
        amax_t = amax_t.amax(0)  # once, not in every program that needs a line's scale
    else:
        launch(_AMAX_ONLY, amax, amax, False)
    scale = _second_launch_scale(amax, granularity, spec)
    if dual:
        launch(_WITH_SCALE, scale, amax, True, qt, scale_t, amax_t)
        return q, scale, qt, scale_t
    launch(_WITH_SCALE, scale, amax, granularity == "row")
    return q, scale


def _quantize_transposed(kernel, xv, q, fmt, granularity, interpret, soft_fp8, recip_scale,
                         exact_div, block_m, block_k, num_warps, split, tiles, num_stages, seeds,
                         stochastic):
    """The unrotated quantization of a strided view xv [M, K] (a transpose: stride (1, M'))
    into q [M, K]: an absmax launch (each program's absmax of each of its lines over its range
    of K, a row of partials per split), then a quantize launch (more, shorter programs: the
    scales computed from the partials, as the reference computes them). Returns (q, scale)."""
    M, K = xv.shape
    config = INTERPRETER_TRANSPOSE_CONFIG if interpret else TRANSPOSE_CONFIG
    bm, bk = block_m or config[0], block_k or config[1]
    tiles = tiles or config[4]
    want = config[3] * _sm_count(xv.device) if config[3] and split is None else 0
    amax_grid, amax_per_split = launch_grid(M, K, bm, 1, False, split, want, k_tile=bk)
    line_blocks, n_split, k_tiles = amax_grid[0], amax_grid[1], triton.cdiv(K, bk)
    spec = FORMATS[fmt]
    extent = max((M - 1) * abs(xv.stride(0)) + (K - 1) * abs(xv.stride(1)), q.numel()) + 1
    kwargs = {} if interpret else {"num_warps": num_warps or config[2]}
    if not interpret and num_stages:
        kwargs["num_stages"] = num_stages

    def launch(mode, grid, per_split, scale, amax, scale_vec):
        kernel[grid](
            xv, q, scale, amax, seeds, M, K, xv.stride(0), xv.stride(1), per_split, n_split,
            INT8=fmt == "int8", MODE=mode, SCALE_VEC=scale_vec,
            SPLITS=triton.next_power_of_2(n_split),
            SOFT_FP8=soft_fp8, MAX_VALUE=spec.max_value, INV_MAX_VALUE=_INV_MAX_VALUE[fmt],
            RECIP_SCALE=recip_scale, EXACT_DIV=exact_div, INT64=extent >= 2**31,
            BLOCK_M=bm, BLOCK_K=bk, EVEN=aligned(M, bm) and aligned(K, bk), STOCHASTIC=stochastic,
            **kwargs,
        )

    amax = torch.empty((n_split, M), dtype=torch.float32, device=xv.device)
    launch(_AMAX_ONLY, amax_grid, amax_per_split, amax, amax, False)
    scale = _second_launch_scale(amax, granularity, spec)
    launch(_WITH_SCALE, (line_blocks, triton.cdiv(k_tiles, tiles)), tiles * bk, scale, amax,
           granularity == "row")
    return q, scale


def hadamard_quantize_triton(x, fmt="fp8_e4m3", granularity="row", block=0, dim=1,
                             rounding="nearest", *, precision="split", soft_fp8=None,
                             block_m=None, num_warps=None, nt=None, split=None, exact_div=True,
                             recip_scale=None, num_stages=None, block_k=None, tiles=None):
    """Run the Triton kernel directly: on CUDA tensors compiled, on CPU tensors through the
    Triton interpreter. Returns (q [M, K] float8_e4m3fn / int8, contiguous; scale float32
    [M, 1] or [1, 1]): the rows of block_hadamard(x, block, dim) quantized per row (or tensor).

    dim=1 rotates along the rows ("inner"); any strides are read in place, so `t.t()` gives the
        quantized transpose of `t` with no transposing pass (grad-weight's dYᵀ and Xᵀ).
    dim=0 rotates along the columns ("outer": H along tokens), still one scale per row.
    rounding: "nearest", or "stochastic" (each value rounded up or down at random, unbiased, as
        quantize.py's reference does, with hashed numbers seeded from torch's generator).
    precision: "split" (float32 values as 3 bf16 dot operands) or "ieee" (float32 dots).
    soft_fp8: compute the E4M3 bits with integer operations (default: only in the interpreter,
        whose float8 cast rounds wrongly).
    block_m / nt / num_warps / split / num_stages: override the launch configuration
        (GPU_CONFIGS; split > 1 divides each program's loop over programs: K for per-row scales,
        then the scales need a second launch; the lines for dim 0, which always takes two;
        num_stages, Triton's software pipelining depth, sets how many tiles in flight a program
        keeps in shared memory). A transposed view without rotation has a kernel of its own
        (TRANSPOSE_CONFIG): block_m lines by block_k K indices a tile, split the absmax
        launch's K ranges, tiles the K tiles of a quantize program.
    exact_div: False multiplies by the reciprocal of the scale instead of dividing (a benchmark
        knob: not bit-exact, and no faster on an H100).
    recip_scale: compute the scale as amax * float32(1 / max) (default: on CUDA, as torch does
        there) rather than amax / max (default on the CPU)."""
    interpret = x.device.type != "cuda"
    return _hadamard_quantize_impl(interpreted if interpret else _JITTED.get, x, fmt,
                                   granularity, block, dim, precision, soft_fp8, interpret,
                                   block_m, num_warps, nt, split, exact_div, recip_scale,
                                   num_stages, block_k=block_k, tiles=tiles, rounding=rounding)


def hadamard_quantize_dual_triton(x, fmt="fp8_e4m3", block=0, rounding="nearest", **launch):
    """x [tokens, features] (grad-output dY) rotated along the tokens and quantized for both
    backward matmuls from one read per launch: (q, scale) as
    `hadamard_quantize_triton(x, fmt, "row", block, dim=0)` gives them (grad-input's dY,
    "outer": a scale per token), and (qt, scale_t) as
    `hadamard_quantize_triton(x.t(), fmt, "row", block)` gives them (grad-weight's dYᵀ
    [features, tokens], contiguous, "inner": a scale per feature). Each tile is loaded and
    rotated once per launch for both. `launch`: the launch overrides of
    `hadamard_quantize_triton` (block_m, num_warps, split, ...)."""
    interpret = x.device.type != "cuda"
    return _hadamard_quantize_impl(interpreted if interpret else _JITTED.get, x, fmt, "row",
                                   block, 0, interpret=interpret, dual=True, rounding=rounding,
                                   **launch)


def _wrapped(kernel_fn):
    """A kernel function launched from a triton_op (Inductor then emits the kernel itself)."""
    return wrap_triton(_JITTED[kernel_fn])


def hadamard_quantize_reference(x, fmt="fp8_e4m3", granularity="row", block=0, dim=1,
                                rounding="nearest"):
    """The plain-torch composition the kernel implements."""
    _check_args(x, fmt, granularity, block, dim, rounding=rounding)
    rotated = block_hadamard(x, block, dim=dim) if block else x.float()
    return quantize(rotated, fmt, granularity, rounding)


def hadamard_quantize_dual_reference(x, fmt="fp8_e4m3", block=0, rounding="nearest"):
    """The plain-torch composition the dual output implements."""
    _check_args(x, fmt, "row", block, 0, rounding=rounding)
    rotated = block_hadamard(x, block, dim=0) if block else x.float()
    return (*quantize(rotated, fmt, "row", rounding),
            *quantize(rotated.t().contiguous(), fmt, "row", rounding))


@triton_op("halo::hadamard_quantize", mutates_args=())
def hadamard_quantize(x: torch.Tensor, fmt: str, granularity: str, block: int,
                      dim: int = 1, rounding: str = "nearest"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-Hadamard rotation along `dim` (block 0: none) then quantization to `fmt`, one
    scale per row (or per tensor), rounding to nearest or stochastically. CUDA: the fused
    Triton kernel; other devices: the plain-torch reference."""
    if x.device.type != "cuda":
        return hadamard_quantize_reference(x, fmt, granularity, block, dim, rounding)
    return _hadamard_quantize_impl(_wrapped, x, fmt, granularity, block, dim,
                                   rounding=rounding)


@triton_op("halo::hadamard_quantize_dual", mutates_args=())
def hadamard_quantize_dual(x: torch.Tensor, fmt: str, block: int, rounding: str = "nearest"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dY rotated along the tokens, quantized for grad-input (a scale per token) and,
    transposed, for grad-weight (a scale per feature): see `hadamard_quantize_dual_triton`.
    CUDA: the fused Triton kernel; other devices: the plain-torch reference."""
    if x.device.type != "cuda":
        return hadamard_quantize_dual_reference(x, fmt, block, rounding)
    return _hadamard_quantize_impl(_wrapped, x, fmt, "row", block, 0, dual=True,
                                   rounding=rounding)
