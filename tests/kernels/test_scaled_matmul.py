"""`halo::scaled_matmul` (and `scaled_matmul_reference`) against float64 `A @ Bᵀ`.

Error is the relative Frobenius error ‖out - ref‖ / ‖ref‖ against `a.double() @ b.double().T`.
"""

import pytest
import torch
from torch.library import opcheck

from halo_compile.kernels.hadamard import block_hadamard, hadamard_block_size, token_block
from halo_compile.kernels.quantize import (
    _DEFERRED_CHECKS,
    NonFiniteInputError,
    quantize,
    raise_pending_nonfinite,
)
from halo_compile.kernels.scaled_matmul import (
    fused_block,
    fused_scaled_matmul,
    reference_gemm,
    scaled_matmul_reference,
)
from halo_compile.kernels.settings import MatmulSettings

FMTS = ["fp8_e4m3", "int8"]
ROTATIONS = ["none", "inner", "outer"]


def _op(a, b, fmt, rotation="none", max_block=0, granularity="row", rounding_a="nearest",
        rounding_b="nearest", check=True, where="test"):
    settings = MatmulSettings(fmt, rotation, max_block, granularity, rounding_a, rounding_b,
                              check, where)
    return torch.ops.halo.scaled_matmul(a, b, settings.encoded)


def _ref_impl(a, b, fmt, rotation="none", max_block=0, granularity="row", rounding_a="nearest",
              rounding_b="nearest", check=True, where="test"):
    return scaled_matmul_reference(a, b, MatmulSettings(fmt, rotation, max_block, granularity,
                                                        rounding_a, rounding_b, check, where))


IMPLS = {"op": _op, "reference": _ref_impl}


def _rel(out, a, b):
    ref = a.double() @ b.double().T
    return ((out.double() - ref).norm() / ref.norm()).item()


def _randn(shape, g, dtype=torch.float32):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _channel_scale(n, g, frac=0.01, magnitude=100.0):
    """A vector of ones with 1% (at least one) entries `magnitude`: outlier channels."""
    idx = torch.randperm(n, generator=g)[: max(1, round(frac * n))]
    s = torch.ones(n)
    s[idx] = magnitude
    return s


# Bounds on Gaussian inputs, measured over 30 seeds on the shapes below (all rotations):
#   fp8 row    3.44e-2 .. 3.91e-2      fp8 tensor  3.52e-2 .. 3.99e-2
#   int8 row   8.0e-3  .. 1.13e-2      int8 tensor 1.07e-2 .. 1.62e-2
# E4M3 rounds each operand with ~2.6e-2 RMS relative error (3 mantissa bits); two operands give
# ~sqrt(2) * 2.6e-2 = 3.7e-2 on the product. The lower bounds show that quantization happened.
GAUSSIAN_BOUNDS = {
    ("fp8_e4m3", "row"): (2.5e-2, 4.2e-2),
    ("fp8_e4m3", "tensor"): (2.5e-2, 4.2e-2),
    ("int8", "row"): (5e-3, 1.25e-2),
    ("int8", "tensor"): (7e-3, 1.8e-2),
}
SHAPES = [(77, 256, 96), (123, 96, 80), (33, 512, 48), (128, 64, 24)]  # (M, K, N)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("fmt", FMTS)
def test_gaussian_error_bounds(fmt, granularity, rotation, seed):
    lo, hi = GAUSSIAN_BOUNDS[(fmt, granularity)]
    for m, k, n in SHAPES:
        g = torch.Generator().manual_seed(seed)
        a, b = _randn((m, k), g), _randn((n, k), g)
        for name, impl in IMPLS.items():
            out = impl(a, b, fmt, rotation, 0, granularity)
            assert out.shape == (m, n) and out.dtype == torch.float32
            err = _rel(out, a, b)
            assert lo < err < hi, (name, (m, k, n), err)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("shape", [(128, 256, 40), (77, 96, 33), (256, 48, 17)])
def test_format_none_is_exact_for_every_rotation(shape, rotation, seed):
    """Without quantization the rotations cancel exactly (inner: (AH)(BH)ᵀ = ABᵀ; outer:
    H(HA)Bᵀ = ABᵀ): only float32 rounding remains, on outlier-heavy inputs too.

    Measured (6 seeds): none/outer <= 2.8e-7; inner <= 3.9e-6, because A and B have their
    outliers on different channels: rotated, each product term carries both outliers, and
    their float32 rounding does not cancel the way the exact terms do."""
    m, k, n = shape
    g = torch.Generator().manual_seed(seed)
    a = _randn((m, k), g) * _channel_scale(k, g) * _channel_scale(m, g)[:, None]
    b = _randn((n, k), g) * _channel_scale(k, g)
    for max_block in (0, 16, 64):
        out = _op(a, b, "none", rotation, max_block)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        assert _rel(out, a, b) < (1e-5 if rotation == "inner" else 1e-6)
        # float64 operands are rotated and multiplied in float64.
        out64 = _op(a.double(), b.double(), "none", rotation, max_block)
        assert out64.dtype == torch.float64
        assert _rel(out64, a, b) < 1e-13


def _dq(x, fmt, granularity):
    q, s = quantize(x, fmt, granularity)
    return q.double() * s.double()


@pytest.mark.parametrize("max_block", [0, 16])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("fmt", FMTS)
def test_matches_composition_of_building_blocks(fmt, granularity, rotation, max_block):
    """The op is exactly the documented placement: "none" Q(A)Q(B)ᵀ, "inner" Q(AH)Q(BH)ᵀ with
    H along K, "outer" H[Q(HA)Q(B)ᵀ] with H along M (A's rows padded with zeros to a multiple
    of token_block); with the block hadamard_block_size / token_block picks."""
    m, k, n = 64, 96, 40
    g = torch.Generator().manual_seed(3)
    a = _randn((m, k), g) * _channel_scale(k, g)
    b = _randn((n, k), g)
    if rotation == "inner":
        blk = hadamard_block_size(k, max_block)
        assert blk == (32 if max_block == 0 else 16)
        expected = _dq(block_hadamard(a, blk), fmt, granularity) @ \
            _dq(block_hadamard(b, blk), fmt, granularity).T
    elif rotation == "outer":  # along the rows, zero-padded to a multiple of the token block
        blk = token_block(max_block)
        assert blk == (256 if max_block == 0 else 16)
        padded = torch.cat([a, a.new_zeros(-m % blk, k)])
        prod = _dq(block_hadamard(padded, blk, dim=0), fmt, granularity) @ \
            _dq(b, fmt, granularity).T
        expected = block_hadamard(prod, blk, dim=0)[:m]
    else:
        expected = _dq(a, fmt, granularity) @ _dq(b, fmt, granularity).T
    out = _op(a, b, fmt, rotation, max_block, granularity)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-6
    # ...and the rotation was not a no-op: the quantized result differs from the unrotated one.
    if rotation != "none":
        assert not torch.equal(out, _op(a, b, fmt, "none", max_block, granularity))


def _outlier_operands(kind, mode, g, m=123, k=256, n=96):
    """Operands of one matmul of a linear, in the layout the backward builds them, with 1% of
    the contraction channels (K = 256) 100x larger.

    kind: "forward"     A = X [T, in],    B = W [out, in]       (K = in)
          "grad_input"  A = dY [T, out],  B = Wᵀ [in, out]      (K = out)
          "grad_weight" A = dYᵀ [out, T], B = Xᵀ [in, T]        (K = T, tokens)
    mode: "left"   outliers only in A (activation / gradient channels)
          "shared" the same channels 100x larger in A and B (e.g. a token large in X and dY)
    M = 123 (odd), N = 96."""
    s = _channel_scale(k, g)
    sb = s if mode == "shared" else torch.ones(k)
    if kind == "forward":
        a = _randn((m, k), g) * s
        b = _randn((n, k), g) * sb
    elif kind == "grad_input":
        a = _randn((m, k), g) * s
        w = _randn((k, n), g) * sb[:, None]  # W [out = K, in = N]
        b = w.t()
    else:
        dy = _randn((k, m), g) * s[:, None]  # dY [T = K, out = M]
        x = _randn((k, n), g) * sb[:, None]  # X [T = K, in = N]
        a, b = dy.t(), x.t()
    return a, b


KINDS = ["forward", "grad_input", "grad_weight"]


# Measured ratio error("none") / error("inner") over 20 seeds, max_block 256:
#   shared outlier channels: fp8 row 4.5..6.0, fp8 tensor 6.9..8.9, int8 row 5.8..7.4,
#                            int8 tensor 6.8..10.6
#   outliers in A only:      int8 row 3.7..4.2, int8 tensor 4.0..6.5
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FMTS)
def test_inner_rotation_cuts_outlier_error_shared_channels(fmt, kind, granularity, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = _outlier_operands(kind, "shared", g)
    err_none = _rel(_op(a, b, fmt, "none", 256, granularity), a, b)
    err_inner = _rel(_op(a, b, fmt, "inner", 256, granularity), a, b)
    assert err_inner * 3 < err_none


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("kind", KINDS)
def test_inner_rotation_cuts_outlier_error_int8_left_outliers(kind, granularity, seed):
    """Outlier channels in the activation/gradient only: INT8's uniform grid, stretched by the
    outliers, rounds the ordinary channels to a few levels; the rotation evens the rows out."""
    g = torch.Generator().manual_seed(seed)
    a, b = _outlier_operands(kind, "left", g)
    err_none = _rel(_op(a, b, "int8", "none", 256, granularity), a, b)
    err_inner = _rel(_op(a, b, "int8", "inner", 256, granularity), a, b)
    assert err_inner * 3 < err_none
    assert err_inner < GAUSSIAN_BOUNDS[("int8", granularity)][1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("kind", KINDS)
def test_inner_rotation_fp8_left_outliers_costs_nothing(kind, granularity, seed):
    """FP8 with outliers in A only: E4M3 is a floating format, so its relative precision does
    not depend on the scale and 100x channels lose the ordinary ones nothing (the values stay
    far above its subnormal range). The rotation cannot gain here (measured ratio none/inner
    0.72..1.12 over 20 seeds), but it must stay within FP8's Gaussian bound."""
    g = torch.Generator().manual_seed(seed)
    a, b = _outlier_operands(kind, "left", g)
    err_none = _rel(_op(a, b, "fp8_e4m3", "none", 256, granularity), a, b)
    err_inner = _rel(_op(a, b, "fp8_e4m3", "inner", 256, granularity), a, b)
    assert err_inner < GAUSSIAN_BOUNDS[("fp8_e4m3", granularity)][1]
    assert err_inner < 1.5 * err_none


def _outlier_rows(g, m=256, k=96, n=80):
    a = _randn((m, k), g) * _channel_scale(m, g)[:, None]  # 1% of the rows 100x larger
    b = _randn((n, k), g)
    return a, b


# Measured (M = 128, 4 seeds): int8 tensor none 7.6e-2..8.1e-2, outer 1.1e-2..1.4e-2
# (ratio 5.4..7.2); fp8 no gain (ratio 0.90..1.09), for the same reason as above.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outer_rotation_cuts_outlier_row_error_int8_per_tensor(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = _outlier_rows(g)
    err_none = _rel(_op(a, b, "int8", "none", 256, "tensor"), a, b)
    err_outer = _rel(_op(a, b, "int8", "outer", 256, "tensor"), a, b)
    assert err_outer * 3 < err_none
    assert err_outer < GAUSSIAN_BOUNDS[("int8", "tensor")][1]


@pytest.mark.parametrize("seed", [0, 1])
def test_outer_rotation_fp8_outlier_rows_within_bound(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = _outlier_rows(g)
    err_outer = _rel(_op(a, b, "fp8_e4m3", "outer", 256, "tensor"), a, b)
    assert err_outer < GAUSSIAN_BOUNDS[("fp8_e4m3", "tensor")][1]


@pytest.mark.parametrize("fmt", FMTS + ["none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = _randn((77, 128), g, dtype), _randn((48, 128), g, dtype)
    out = _op(a, b, fmt, "inner")
    assert out.dtype == dtype and out.shape == (77, 48)
    # The bound of the format, plus the output rounding (bf16: 2^-9 relative).
    bound = 1e-2 if fmt == "none" else GAUSSIAN_BOUNDS[(fmt, "row")][1] + 1e-2
    assert _rel(out, a, b) < bound


@pytest.mark.parametrize("fmt", FMTS)
def test_stochastic_rounding(fmt):
    g = torch.Generator().manual_seed(0)
    a, b = _randn((64, 128), g), _randn((40, 128), g)
    torch.manual_seed(0)
    out1 = _op(a, b, fmt, "inner", rounding_a="stochastic")
    out2 = _op(a, b, fmt, "inner", rounding_a="stochastic")
    assert not torch.equal(out1, out2)
    for out in (out1, out2):
        assert _rel(out, a, b) < 1.5 * GAUSSIAN_BOUNDS[(fmt, "row")][1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS + ["none"])
@pytest.mark.parametrize("operand", ["left", "right"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_inputs(bad, operand, fmt, impl):
    g = torch.Generator().manual_seed(0)
    a, b = _randn((33, 64), g), _randn((24, 64), g)
    (a if operand == "left" else b)[5, 7] = bad
    with pytest.raises(NonFiniteInputError, match=f"layer9 forward \\({operand} operand\\)"):
        IMPLS[impl](a, b, fmt, "inner", 0, "row", check=True, where="layer9 forward")
    out = IMPLS[impl](a, b, fmt, "inner", 0, "row", check=False)
    assert out.shape == (33, 24)
    assert not bool(torch.isfinite(out).all())


def test_fake_shape_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(37, 64), torch.empty(48, 64)
        out = _op(a, b, "fp8_e4m3", "inner")
        assert out.shape == (37, 48) and out.dtype == torch.float32
        out = _op(a.to(torch.bfloat16), b.to(torch.bfloat16), "int8")
        assert out.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="inner dimensions differ"):
            _op(a, torch.empty(48, 32), "fp8_e4m3")
        with pytest.raises(RuntimeError, match="2-D"):
            _op(torch.empty(2, 37, 64), b, "fp8_e4m3")


# test_autograd_registration passes, but only with inputs that do not require grad:
# halo::scaled_matmul deliberately has no autograd formula (halo::quantized_linear differentiates
# through its own registered backward, which calls this op on plain tensors), so
# test_aot_dispatch_dynamic with requires_grad inputs would fail by design: it is run on
# non-grad inputs only. Stochastic rounding is left out: it is random, and opcheck compares
# eager and traced outputs.
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("fmt", FMTS + ["none"])
def test_opcheck(fmt, rotation):
    g = torch.Generator().manual_seed(0)
    a, b = _randn((64, 96), g), _randn((48, 96), g)
    opcheck(
        torch.ops.halo.scaled_matmul.default,
        (a, b, MatmulSettings(fmt, rotation, 0, "row", where="opcheck").encoded),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                    "test_aot_dispatch_dynamic"),
    )


def test_checked_scale_opcheck_and_result():
    g = torch.Generator().manual_seed(2)
    sa, sb = torch.rand(8, 1, generator=g) + 0.1, torch.rand(5, 1, generator=g) + 0.1
    opcheck(torch.ops.halo.checked_scale.default, (sa, sb, 0.25, "opcheck"))
    assert torch.equal(torch.ops.halo.checked_scale(sa, sb, 0.25, "m"), sa * 0.25)


def test_report_nonfinite_opcheck_and_verdict():
    g = torch.Generator().manual_seed(3)
    scales = [torch.rand(8, 1, generator=g) + 0.1, torch.rand(5, 1, generator=g) + 0.1]
    opcheck(torch.ops.halo.report_nonfinite.default, (torch.empty(0), scales, ["a", "b"]))
    scales[1][2, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"in b;"):
        torch.ops.halo.report_nonfinite(torch.empty(0), scales, ["a", "b"])


def test_opcheck_odd_shapes_tensor_scales():
    g = torch.Generator().manual_seed(1)
    a, b = _randn((17, 40), g, torch.bfloat16), _randn((9, 40), g, torch.bfloat16)
    opcheck(torch.ops.halo.scaled_matmul.default,
            (a, b, MatmulSettings("int8", "outer", 16, "tensor", check_finite=False,
                                  where="opcheck").encoded))


def _linear_operands(g, dtype, tokens=96, d_in=80, d_out=48):
    """The (A, B) pairs of a linear's three matmuls, in the layouts the backward passes them:
    forward (X, W), grad-input (dY, Wᵀ), grad-weight (dYᵀ, Xᵀ): the last three are transposed
    views, which the fused kernel reads in place. Outlier channels in X, outlier tokens in dY."""
    x = _randn((tokens, d_in), g) * _channel_scale(d_in, g)
    w = _randn((d_out, d_in), g)
    dy = _randn((tokens, d_out), g) * _channel_scale(tokens, g)[:, None]
    x, w, dy = x.to(dtype), w.to(dtype), dy.to(dtype)
    return {"forward": (x, w), "grad_input": (dy, w.t()), "grad_weight": (dy.t(), x.t())}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("fmt,granularity", [("fp8_e4m3", "row"), ("int8", "tensor")])
def test_fused_path_in_interpreter_matches_reference(fmt, granularity, rotation, seed):
    """The CUDA path's composition (fused Triton quantize of each operand, run here through the
    Triton interpreter, then the GEMM; the outer rotation undone by a ±1 block product) against
    the reference, on all three matmul layouts. Without rotation the quantized operands are
    bit-identical, so is the product; rotated, the kernel sums the Hadamard in another order,
    which moves scales by ~1e-7 and rarely one value by one quantum."""
    g = torch.Generator().manual_seed(seed)
    for matmul, (a, b) in _linear_operands(g, torch.float32).items():
        for max_block in (16, 256):
            block = fused_block(a, b, MatmulSettings(fmt, rotation, max_block))
            assert block is not None
            settings = MatmulSettings(fmt, rotation, max_block, granularity, where=matmul)
            out = fused_scaled_matmul(reference_gemm, a, b, settings, block)
            ref = scaled_matmul_reference(a, b, settings)
            assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
            if rotation == "none":
                assert torch.equal(out, ref), matmul
            else:
                rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                assert rel < 1e-4, (matmul, max_block, rel)


def test_fused_path_bf16_operands_in_interpreter():
    g = torch.Generator().manual_seed(5)
    for matmul, (a, b) in _linear_operands(g, torch.bfloat16).items():
        for rotation in ROTATIONS:
            block = fused_block(a, b, MatmulSettings("fp8_e4m3", rotation, 256))
            settings = MatmulSettings("fp8_e4m3", rotation, 256, "row", where=matmul)
            out = fused_scaled_matmul(reference_gemm, a, b, settings, block)
            ref = scaled_matmul_reference(a, b, settings)
            assert out.dtype == torch.bfloat16
            rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert rel < 1e-2, (matmul, rotation, rel)  # both round to bf16 once or twice


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_fused_path_non_finite_in_interpreter():
    a = torch.randn(33, 64)
    b = torch.randn(24, 64)
    b[3, 3] = float("inf")
    with pytest.raises(NonFiniteInputError, match="right operand"):
        fused_scaled_matmul(reference_gemm, a, b, MatmulSettings("fp8_e4m3", "inner", where="t"),
                            64)
    with pytest.raises(NonFiniteInputError, match="left operand"):
        fused_scaled_matmul(reference_gemm, b, a, MatmulSettings("int8", "outer", where="t"), 0)


def test_fused_path_applies_where_the_kernel_can():
    a, b = torch.randn(64, 4096), torch.randn(32, 4096)
    assert fused_block(a, b, MatmulSettings("fp8_e4m3", "inner", 256)) == 256
    assert fused_block(a, b, MatmulSettings("fp8_e4m3", "outer", 256)) == 256  # rows padded to 256
    assert fused_block(a, b, MatmulSettings("fp8_e4m3", "outer", 0)) == 256
    assert fused_block(a, b, MatmulSettings("fp8_e4m3", "outer", 32)) == 32
    assert fused_block(a, b, MatmulSettings("int8", "none", 0)) == 0
    assert fused_block(a, b, MatmulSettings("fp8_e4m3", "inner", 0)) is None  # "full": block 4096
    assert fused_block(a, b, MatmulSettings("none", "inner", 256)) is None
    assert fused_block(a.double(), b.double(), MatmulSettings("int8", "none", 0)) is None


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_fused_path_rounds_the_left_operand_stochastically(fmt):
    """grad_rounding="stochastic" on the fused path: the kernel rounds dY (the left operand of
    both gradient matmuls) at random; the product stays as close to the float64 one as the
    reference's stochastic rounding keeps it, and differs from the nearest-rounding product."""
    g = torch.Generator().manual_seed(8)
    for matmul, (a, b) in _linear_operands(g, torch.float32).items():
        for rotation in ROTATIONS:
            block = fused_block(a, b, MatmulSettings(fmt, rotation, 64))
            torch.manual_seed(1)
            stochastic = MatmulSettings(fmt, rotation, 64, "row", "stochastic", where=matmul)
            out = fused_scaled_matmul(reference_gemm, a, b, stochastic, block)
            nearest = fused_scaled_matmul(reference_gemm, a, b,
                                          MatmulSettings(fmt, rotation, 64, where=matmul), block)
            torch.manual_seed(1)
            ref = scaled_matmul_reference(a, b, stochastic)
            assert not torch.equal(out, nearest)
            err, err_ref = _rel(out, a, b), _rel(ref, a, b)
            assert err < 1.5 * err_ref + 1e-3, (matmul, rotation, err, err_ref)


# --- GPU ------------------------------------------------------------------------------------

GPU_SHAPES = [(8191, 4096, 4095), (123, 257, 77), (1, 64, 16), (16, 16, 16), (17, 33, 9),
              (512, 1000, 384)]


def _gpu_cases():
    for fmt, dtype in [("fp8_e4m3", torch.bfloat16), ("fp8_e4m3", torch.float32),
                       ("int8", torch.bfloat16), ("int8", torch.float32)]:
        for granularity in ("tensor", "row"):
            yield fmt, dtype, granularity


# Measured on an H100 (torch 2.11, cuBLASLt), kernel vs reference on the same CUDA inputs,
# Frobenius / elementwise-max-over-max|ref|, all rotations:
#   int8, bf16 or fp32 output:  0 / 0 (bitwise equal: the INT8 GEMM accumulates exactly in int32)
#                               without rotation; rotated, the fused Triton quantizer sums the
#                               Hadamard in another order than the reference (scales ~1e-7
#                               apart, rarely a value one quantum apart)
#   fp8, bf16 output:           up to 9.1e-4 / 7.0e-3 (bf16 rounding in the GEMM epilogue; the
#                               outer rotation mixes those roundings)
#   fp8, fp32 output:           3e-5..1.3e-4 / up to 2.3e-4. Not a padding or scaling error: the
#                               FP8 tensor-core MMA accumulates with ~2^-13 relative precision
#                               (not IEEE fp32), which no cuBLAS setting of torch._scaled_mm
#                               turns off; the reference sums exactly in fp32.
# Unwritten or stale output regions would give errors of order 1.
CUDA_TOLERANCES = {  # (Frobenius, elementwise relative to max|ref|)
    ("fp8_e4m3", torch.bfloat16): (1e-2, 2 ** -6),
    ("fp8_e4m3", torch.float32): (5e-4, 1e-3),
    ("int8", torch.bfloat16): (1e-2, 2 ** -6),
    ("int8", torch.float32): (1e-6, 1e-6),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt,dtype,granularity", list(_gpu_cases()))
def test_cuda_kernel_matches_reference(fmt, dtype, granularity, shape):
    """The CUDA kernel (torch._scaled_mm, every dimension padded to a multiple of 16 and sliced
    back / the Triton INT8 GEMM, edges masked) computes what the reference computes on the same
    CUDA inputs, up to summation order and the output rounding."""
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    a = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, k, device="cuda", generator=g).to(dtype)
    for rotation in ("none", "inner", "outer"):
        frob_tol, elem_tol = CUDA_TOLERANCES[(fmt, dtype)]
        if rotation != "none":  # a rotated value may sit one quantum from the reference's
            frob_tol, elem_tol = max(frob_tol, 1e-4), max(elem_tol, 1e-2)
        out = _op(a, b, fmt, rotation, 256, granularity)
        ref = scaled_matmul_reference(a, b, MatmulSettings(fmt, rotation, 256, granularity))
        assert out.shape == (m, n) and out.dtype == dtype and out.device == a.device
        assert out.is_contiguous()
        assert bool(torch.isfinite(out).all())
        diff = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert diff < frob_tol, (rotation, diff)
        # Elementwise too: no region of the output left unwritten or stale.
        worst = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
        assert worst < elem_tol, (rotation, worst)
        if 4096 <= m * n <= 1 << 20:  # vs float64: enough outputs for a stable error
            bound = GAUSSIAN_BOUNDS[(fmt, granularity)][1] + (1e-2 if dtype == torch.bfloat16
                                                              else 0)
            assert _rel(out, a, b) < bound


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_non_finite(fmt):
    a = torch.randn(33, 64, device="cuda")
    b = torch.randn(24, 64, device="cuda")
    b[3, 3] = float("inf")
    with pytest.raises(NonFiniteInputError, match="right operand"):
        _op(a, b, fmt, "inner", check=True)
        raise_pending_nonfinite()  # CUDA checks are deferred: this waits for their verdicts
    _op(a, a, fmt, "inner", check=True)
    raise_pending_nonfinite()  # a clean call leaves nothing pending
    out = _op(a, b, fmt, "inner", check=False)
    assert not bool(torch.isfinite(out).all())


@pytest.mark.gpu
def test_cuda_non_finite_is_raised_by_a_later_call_without_a_sync():
    a = torch.randn(64, 64, device="cuda")
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="left operand"):
        # Checks are reduced in batches of `flush_every` submissions; once a batch's event has
        # completed, any later check reads its verdict, without a sync of its own.
        _op(bad, a, "fp8_e4m3", "none", check=True)
        for _ in range(_DEFERRED_CHECKS.flush_every):
            _op(a, a, "fp8_e4m3", "none", check=True)
        torch.cuda.synchronize()
        _op(a, a, "fp8_e4m3", "none", check=True)
    raise_pending_nonfinite()  # the calls after the bad one were clean


@pytest.mark.gpu
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_linear_layouts_match_reference(fmt, rotation):
    """The three matmuls of a linear with the backward's transposed views (grad-weight's dYᵀ
    and Xᵀ are read in place by the fused kernel), on the device."""
    g = torch.Generator().manual_seed(7)
    for matmul, (a, b) in _linear_operands(g, torch.bfloat16, 4096, 1024, 768).items():
        a, b = a.cuda(), b.cuda()
        out = _op(a, b, fmt, rotation, 256)
        ref = scaled_matmul_reference(a, b, MatmulSettings(fmt, rotation, 256))
        assert out.is_contiguous() and out.dtype == torch.bfloat16
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < 1e-2, (matmul, rel)
