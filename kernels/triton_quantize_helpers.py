"""The `@triton.jit` helpers of halo's quantize kernels: the scale of an absmax, the Hadamard
rotation as dots with ±1 blocks, the quantized value (rounded to nearest or stochastically) and
its random bits.

They are @triton.jit functions, not module-level aliases or plain Python: Inductor re-emits a
user kernel's source for a compiled graph together with the @triton.jit functions it calls (and
nothing else of its module), and triton_interpreter.py interprets them with the kernel on CPU
tensors. Reductions are spelled `tl.reduce(..., tl.standard._elementwise_max)` rather than
`tl.max`: an interpreted kernel built without TRITON_INTERPRET cannot call
triton.language.standard's @triton.jit functions, and that spelling compiles on the GPU too.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Kernel modes (the MODE constexpr of every quantize kernel).
ONE_LAUNCH = 0  # per-line scales, whole lines per program: absmax, then quantize
ABSMAX = 1  # each program's absmax of each of its scales, a row of partials per split
QUANTIZE = 2  # quantize with the scales computed from the ABSMAX launch's partials
QUANTIZE_WITH_SCALE = 3  # quantize with one given scale (granularity "tensor")


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
    """The absmax of scales `idx` (1-D): the max of the ABSMAX launch's partial absmaxes, one
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
    (the interpreter, whose bf16 dot multiplies the raw bit patterns): the operands in float32,
    the same exact products."""
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
def _hadamard_factors(NB: tl.constexpr, R: tl.constexpr, X_TYPE: tl.constexpr,
                      X_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The ±1 factors of a 256-wide block transform X -> G X H_16, broadcast over a batch of NB
    tiles: H_16 (acts on a tile's `low` index, a right product) and G = I_(16/R) (x) H_R (on
    `mid`, a left product), with H[u, v] = (-1)^popcount(u & v). Returned as dot operands for
    float32 values (bf16 pieces; float32 under the interpreter) and for the input itself (its
    own type X_TYPE; float32 inputs are split like any float32): (h16, g, h16_for_x, g_for_x)."""
    i16 = tl.arange(0, 16)
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
    if UPCAST_DOT:
        h16_op = h16_f
        g_op = g_f
    else:
        h16_op = h16_f.to(tl.bfloat16)
        g_op = g_f.to(tl.bfloat16)
    if UPCAST_DOT or X_FP32:
        h16_xop = h16_op
        g_xop = g_op
    else:
        h16_xop = h16_f.to(X_TYPE)
        g_xop = g_f.to(X_TYPE)
    return h16_op, g_op, h16_xop, g_xop


@triton.jit
def _rotated(x, h16_op, g_op, h16_xop, g_xop, HB: tl.constexpr, R: tl.constexpr,
             X_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr, INV_SQRT: tl.constexpr,
             POW2_NORM: tl.constexpr):
    """A batch of [16, 16] tiles (k = 16 * mid + low) rotated, in float32: G X H_16 / sqrt(HB)
    (without the 1 / sqrt(HB) when POW2_NORM folds it into the scales); x.to(float32) for HB 0.
    G X first, with the loaded tile as the right operand; its float32 accumulator is then the
    left operand of the product with H_16 (a conversion that stays in registers). Skipped
    products (G for HB 16) are identities."""
    if HB == 0:
        y = x.to(tl.float32)
    else:
        if R == 1:
            v = x
        else:
            v = _pm1_dot(x, g_xop, False, X_FP32, UPCAST_DOT)
        if R == 1 and not X_FP32:  # v is the input: exact as an operand
            y = _pm1_dot(v, h16_xop, True, False, UPCAST_DOT)
        else:  # v is float32
            y = _pm1_dot(v, h16_op, True, True, UPCAST_DOT)
        if not POW2_NORM:
            y = y * INV_SQRT
    return y


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
    of the index and the launch's seed `which` (0: q, 1: the dual transpose's qt). Not Philox
    (tl.randint): its 10 rounds on 6 live words per value spill the registers of the strided
    kernels (docs/design.md), where this costs 7 integer operations on one word. Indices wrap
    at 2^32."""
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
def _quantized(y, divisor, inv, INT8: tl.constexpr, SOFT_FP8: tl.constexpr,
               MAX_VALUE: tl.constexpr, bits, STOCHASTIC: tl.constexpr):
    """y / divisor (inv = RN(1 / divisor)) rounded to INT8 or FP8 E4M3: to nearest, or with
    STOCHASTIC up or down at random (`bits`: 32 random bits per element). SOFT_FP8: the E4M3
    bits computed with integer operations (the interpreter's float8 cast rounds wrongly when
    rounding carries into the exponent)."""
    # y / divisor correctly rounded (Markstein: with inv = RN(1 / divisor), one FMA
    # correction of RN(y * inv) gives RN(y / divisor); only for |y| in the subnormal range
    # can it differ, and such values quantize to zero anyway). Cheaper than div.rn.f32.
    val = y * inv
    res = tl.fma(-val, divisor, y)  # exact residual
    val = tl.where(res == 0.0, val, tl.fma(res, inv, val))  # keeps -0.0
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
