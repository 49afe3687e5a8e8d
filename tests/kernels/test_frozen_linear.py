"""`halo::frozen_linear` / `halo::frozen_weight_matmul`: the trained-weight ops' exact results,
with the frozen weight quantized once per version."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from halo_compile.kernels.frozen_linear import fused_frozen_weight_matmul
from halo_compile.kernels.quantize import NonFiniteInputError
from halo_compile.kernels.scaled_matmul import (
    fused_block,
    fused_scaled_matmul,
    reference_gemm,
    scaled_matmul_reference,
)
from halo_compile.kernels.settings import LinearSettings, MatmulSettings, WeightSource
from halo_compile.kernels.weight_cache import FOLDS, WEIGHT_CACHE

ROTATIONS = ["none", "inner", "outer"]
WEIGHT = WeightSource().encoded  # the frozen weight itself, stored [out, in]


def _settings(fmt="fp8_e4m3", forward="inner", grad_input="outer", **others) -> str:
    """A linear's encoded settings (max_block 0: blocks as large as the dimensions allow)."""
    return LinearSettings(fmt, "row", forward, grad_input, name="lin", **others).encoded


def _inputs(seed, tokens=64, d_in=96, d_out=80, outliers=True):
    """x [2, tokens/2, in] with a few 100x channels, a frozen weight [out, in], bias, dY."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, d_in, generator=g, dtype=torch.float64)
    if outliers:
        x[..., torch.randperm(d_in, generator=g)[:2]] *= 100.0
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    gy = torch.randn(2, tokens // 2, d_out, generator=g, dtype=torch.float64)
    return x, w, b, gy


def _frozen(w, transposed=False):
    return torch.nn.Parameter((w.t().contiguous() if transposed else w).float(),
                              requires_grad=False)


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fmt,granularity", [("fp8_e4m3", "row"), ("int8", "tensor"),
                                             ("none", "row")])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_equals_scaled_matmul_exactly(seed, fmt, granularity, rotation, transpose):
    """Same rotation, same rounding: bit-identical to halo::scaled_matmul on op(weight)."""
    x, w, _, _ = _inputs(seed)
    a = x.reshape(-1, x.shape[-1]).float()
    weight = _frozen(w.t() if transpose else w)  # op(weight) is [out, in] either way
    settings = MatmulSettings(fmt, rotation, 0, granularity, where="m")
    out = torch.ops.halo.frozen_weight_matmul(a, weight, [], WeightSource("", transpose).encoded,
                                              settings.encoded)
    ref = scaled_matmul_reference(a, weight.t() if transpose else weight, settings)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("transpose", [False, True])
def test_fused_path_equals_fused_scaled_matmul(seed, fmt, rotation, transpose):
    """The CUDA fast path, with the Triton kernel interpreted and the GEMM in float32: the
    activation side is the same kernel as fused_scaled_matmul's; the cached weight side comes
    from the reference, which may differ from the kernel by one quantum in a rare value, and the
    frozen GEMM op returns bf16 (as cuBLASLt does on the GPU) where the CPU reference GEMM keeps
    float32 until after "outer"'s un-rotation: agreement to bf16's resolution."""
    x, w, _, _ = _inputs(seed)
    a = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    weight = _frozen(w.t() if transpose else w)
    b = (weight.t() if transpose else weight).to(a.dtype)
    settings = MatmulSettings(fmt, rotation, 256, "row", where="m")
    block = fused_block(a, weight, settings)
    assert block == (0 if rotation == "none" else 32 if rotation == "inner" else 256)
    out = fused_frozen_weight_matmul(a, weight, [], WeightSource("", transpose), settings, block)
    want = fused_scaled_matmul(reference_gemm, a, b, settings, block)
    assert out.dtype == torch.bfloat16 and _rel(out, want) < 2**-7
    WEIGHT_CACHE.forget([weight])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fwd,gi", list(itertools.product(ROTATIONS, ROTATIONS)))
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_linear_equals_quantized_linear_with_a_frozen_weight(seed, fwd, gi, fmt):
    """Output, grad-input and grad-bias equal halo::quantized_linear's; no weight gradient."""
    x, w, b, gy = _inputs(seed)
    settings = _settings(fmt, fwd, gi)
    xf, xq = x.float().requires_grad_(), x.float().requires_grad_()
    bf, bq = b.float().requires_grad_(), b.float().requires_grad_()
    weight = _frozen(w)
    y = torch.ops.halo.frozen_linear(xf, weight, [], bf, WEIGHT, settings)
    y.backward(gy.float())
    yq = torch.ops.halo.quantized_linear(xq, weight, bq, settings)
    yq.backward(gy.float())
    assert torch.equal(y, yq) and torch.equal(xf.grad, xq.grad) and torch.equal(bf.grad, bq.grad)
    assert weight.grad is None
    # And within the format's error of float64 (test_quantized_linear.py's bounds, outliers
    # in x: rotated fp8 measured 3.0e-2 .. 3.9e-2).
    x64 = x.clone().requires_grad_()
    F.linear(x64, w, b).backward(gy)
    bound = 4.2e-2 if fmt == "fp8_e4m3" else 6e-2
    assert _rel(y, F.linear(x, w, b)) < bound and _rel(xf.grad, x64.grad) < bound


def test_weight_stored_transposed():
    """GPT-2's Conv1D stores [in, out]: same results as the [out, in] weight."""
    x, w, b, gy = _inputs(3)
    outs = []
    for transposed in (False, True):
        xl = x.float().requires_grad_()
        y = torch.ops.halo.frozen_linear(xl, _frozen(w, transposed), [], b.float(),
                                         WeightSource("", transposed).encoded, _settings())
        y.backward(gy.float())
        outs.append((y, xl.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_weight_quantized_once_per_version():
    x, w, b, gy = _inputs(4)
    weight = _frozen(w)
    WEIGHT_CACHE.forget()
    before = WEIGHT_CACHE.computations
    for _ in range(3):
        xl = x.float().requires_grad_()
        torch.ops.halo.frozen_linear(xl, weight, [], None, WEIGHT,
                                     _settings()).backward(gy.float())
    # Two derived copies: Q(W H) for the forward, Q(Wᵀ) for grad-input.
    assert WEIGHT_CACHE.computations - before == 2
    with torch.no_grad():
        weight.add_(0.01)
    torch.ops.halo.frozen_linear(x.float(), weight, [], None, WEIGHT, _settings())
    assert WEIGHT_CACHE.computations - before == 3


def test_a_weight_that_requires_grad_is_refused():
    x, w, b, _ = _inputs(5)
    with pytest.raises(ValueError, match="lin.*requires grad"):
        torch.ops.halo.frozen_linear(x.float().requires_grad_(), w.float().requires_grad_(),
                                     [], None, WEIGHT, _settings("int8", "none", "none"))
    # A tensor folded into the weight (an RMSNorm scale) that is trained: also refused.
    scale = torch.ones(w.shape[1], requires_grad=True)
    fold = FOLDS.register(lambda weight, norm_scale: weight * norm_scale)
    with pytest.raises(ValueError, match="lin.*fold input requires grad"):
        torch.ops.halo.frozen_linear(x.float().requires_grad_(), _frozen(w), [scale], None,
                                     WeightSource(fold).encoded, _settings("int8", "none", "none"))


def test_folded_weight_is_cached_per_version_of_each_fold_input():
    x, w, _, _ = _inputs(8)
    weight, scale = _frozen(w), torch.rand(w.shape[1]) + 0.5
    fold = FOLDS.register(lambda weight, norm_scale: weight * norm_scale)
    args = (None, WeightSource(fold).encoded, _settings())
    before = WEIGHT_CACHE.computations
    y = torch.ops.halo.frozen_linear(x.float(), weight, [scale], *args)
    want = torch.ops.halo.quantized_linear(x.float(), (weight * scale).float(), None, _settings())
    assert torch.equal(y, want)
    torch.ops.halo.frozen_linear(x.float(), weight, [scale], *args)
    assert WEIGHT_CACHE.computations - before == 1
    scale.mul_(2.0)  # the fold input changes: the cached weight is re-derived
    y = torch.ops.halo.frozen_linear(x.float(), weight, [scale], *args)
    assert WEIGHT_CACHE.computations - before == 2
    assert torch.equal(y, torch.ops.halo.quantized_linear(
        x.float(), (weight * scale).float(), None, _settings()))


@pytest.mark.parametrize("where", ["forward", "grad-input"])
def test_non_finite_raises_with_the_matmul_name(where):
    x, w, b, gy = _inputs(6)
    (x if where == "forward" else gy)[0, 1, 2] = float("nan")
    xl = x.float().requires_grad_()
    with pytest.raises(NonFiniteInputError, match=f"lin {where}"):
        torch.ops.halo.frozen_linear(xl, _frozen(w), [], None, WEIGHT,
                                     _settings()).backward(gy.float())


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "none"])
def test_opcheck(fmt):
    x, w, b, _ = _inputs(7, tokens=48, d_in=48, d_out=32)
    args = (x.float().requires_grad_(), _frozen(w), [], b.float().requires_grad_(), WEIGHT,
            _settings(fmt, fast_accum=True))
    opcheck(torch.ops.halo.frozen_linear.default, args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                        "test_aot_dispatch_dynamic"))
    matmul_args = (x[0].float(), _frozen(w), [], WEIGHT,
                   MatmulSettings(fmt, "inner", 0, "row", where="m").encoded)
    opcheck(torch.ops.halo.frozen_weight_matmul.default, matmul_args)
    # The cached weight side of the fused path. INT8 only: opcheck's schema check compares the
    # outputs with ops that have no float8 CPU kernel.
    # Rotated (block 16) and not (0: a transposed view quantized as it is, which must still
    # come out row-major, as the fake says).
    for block in (16, 0) if fmt == "int8" else ():
        weight_args = (_frozen(w), [], WeightSource(transpose=True).encoded,
                       MatmulSettings(fmt, where="g").encoded, block, torch.float32)
        opcheck(torch.ops.halo.cached_quantized_weight.default, weight_args,
                test_utils=("test_schema", "test_faketensor"))
