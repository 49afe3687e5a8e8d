"""Inductor's view of the quantized matmuls: the decomposition computes what the op computes,
applies exactly where the fused kernel does, and (GPU) leaves Inductor's generated code with
the Triton kernel and the FP8 GEMM instead of calls back into halo's Python ops."""

import copy
import re

import pytest
import torch

import halo_compile  # noqa: F401  (registers the backend)
from halo_compile.kernels.hadamard import sylvester_signs
from halo_compile.kernels.inductor_decompositions import (
    DECOMPOSITIONS,
    decompose_quantized_linear,
    decompose_scaled_matmul,
)
from halo_compile.kernels.quantize import NonFiniteInputError, raise_pending_nonfinite
from halo_compile.kernels.scaled_matmul import (
    cuda_gemm,
    fused_block,
    fused_scaled_matmul,
    gemm_with,
    scaled_matmul_reference,
)
from halo_compile.kernels.settings import LinearSettings, MatmulSettings


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _operands(m, n, k, dtype, seed, device="cpu", outliers=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g, dtype=torch.float64)
    if outliers:  # a few channels 100x larger
        a[:, torch.randperm(k, generator=g)[:max(1, k // 64)]] *= 100
    b = torch.randn(n, k, generator=g, dtype=torch.float64)
    return a.to(dtype).to(device), b.to(dtype).to(device)


def _decomposed(a, b, fmt, rotation, max_block=256, check=True):
    """The pieces the decomposition emits, run eagerly: on the CPU the quantize op is the
    reference and the GEMM is torch's CPU `_scaled_mm` / the INT8 op's reference."""
    settings = MatmulSettings(fmt, rotation, max_block, check_finite=check, where="test")
    return fused_scaled_matmul(
        cuda_gemm, a, b, settings, fused_block(a, b, settings),
        quantize_operand=lambda x, *args: torch.ops.halo.hadamard_quantize(x, fmt, *args[1:]),
        signs=sylvester_signs)


# The decomposed path rounds where the op's reference does not: the GEMM's output to bf16 (FP8
# row-wise `_scaled_mm` writes bf16), and "outer"'s un-rotation in the output's dtype. So bf16
# outputs agree to bf16's resolution (2^-8 relative) and float32 ones to float32 summation order.
BOUNDS = {torch.bfloat16: 2**-7, torch.float32: 1e-5}


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("rotation", ["none", "inner", "outer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decomposed_pieces_match_reference(fmt, rotation, dtype, seed):
    # Odd-ish sizes: M 80 and N 40 are not multiples of the GEMM's 16-alignment after blocks.
    a, b = _operands(80, 40, 96, dtype, seed)
    out = _decomposed(a, b, fmt, rotation)
    ref = scaled_matmul_reference(a, b, MatmulSettings(fmt, rotation, 256, "row"))
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    assert _rel(out, ref) < BOUNDS[dtype]


def test_fast_accumulation_reaches_the_gemm_of_the_decomposed_path():
    a, b = _operands(32, 48, 64, torch.bfloat16, 9)
    seen = []

    def recording_gemm(*args, fast_accum=False):
        seen.append(fast_accum)
        return cuda_gemm(*args, fast_accum=fast_accum)

    settings = MatmulSettings("fp8_e4m3", "inner", 256, where="t")
    block = fused_block(a, b, settings)
    for fast in (True, False):
        out = fused_scaled_matmul(
            gemm_with(recording_gemm, fast), a, b, settings, block,
            quantize_operand=lambda x, *args: torch.ops.halo.hadamard_quantize(
                x, "fp8_e4m3", *args[1:]))
        # The CPU's `_scaled_mm` takes the flag and accumulates in float32 either way.
        ref = scaled_matmul_reference(a, b, settings)
        assert _rel(out, ref) < 2**-7
    assert seen == [True, False]


def test_decomposed_pieces_pad_unaligned_gemm_dims():
    a, b = _operands(37, 21, 64, torch.bfloat16, 3)
    out = _decomposed(a, b, "fp8_e4m3", "inner")
    ref = scaled_matmul_reference(a, b, MatmulSettings("fp8_e4m3", "inner", 256, "row"))
    assert _rel(out, ref) < 2**-7


def test_decomposed_check_names_the_operand():
    a, b = _operands(32, 32, 64, torch.float32, 4)
    b[3, 5] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"test \(right operand\)"):
        _decomposed(a, b, "fp8_e4m3", "inner")
    raise_pending_nonfinite()
    assert torch.isnan(_decomposed(a, b, "fp8_e4m3", "inner", check=False)).any()


def test_decompositions_leave_what_the_fused_kernel_does_not_cover():
    a, b = _operands(32, 32, 64, torch.bfloat16, 5)
    settings = MatmulSettings("fp8_e4m3", "inner", 256, where="t")
    assert decompose_scaled_matmul(a, b, settings.encoded) is NotImplemented  # CPU: reference
    w = b.clone()
    linear = LinearSettings("fp8_e4m3", "row", "inner", "inner", "outer", 256, name="t")
    assert decompose_quantized_linear(a, w, None, linear.encoded) is NotImplemented
    # On CUDA too: blocks above 256, format none and float64 stay whole.
    assert fused_block(a, b, MatmulSettings("fp8_e4m3", "inner", 0)) == 64
    assert fused_block(a.double(), b.double(), MatmulSettings("int8", "none", 0)) is None
    assert {op._name for op in DECOMPOSITIONS} == {
        "scaled_matmul", "quantized_linear", "frozen_weight_matmul", "frozen_linear"}


def _compiled_linear_code(x, weight, options, grad_out=None):
    """Inductor's generated code (forward and backward) and results for one halo linear, its
    backward from `grad_out` (default ones)."""
    from torch._inductor.utils import run_and_get_code

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=x.device,
                             dtype=x.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    compiled = torch.compile(linear, backend="halo", options=options, fullgraph=True)

    def step():
        y = compiled(x)
        y.backward(torch.ones_like(y) if grad_out is None else grad_out)
        return y

    y, code = run_and_get_code(step)
    return y, linear.weight.grad, "\n".join(code)


# halo's rotating quantize kernels (kernels/triton_rows_quantize.py, triton_columns_quantize.py)
ROTATING_QUANTIZE_KERNELS = ("_hadamard_quantize_rows_kernel", "_hadamard_quantize_columns_kernel")


def _quantize_kernel_mentions(code: str) -> int:
    """How often generated code names the rotating quantize kernels (definitions and launches)."""
    return sum(code.count(name) for name in ROTATING_QUANTIZE_KERNELS)


@pytest.mark.gpu
@pytest.mark.parametrize("hadamard", ["none", "halo2", "all_inner"])
def test_gpu_generated_code_launches_kernels_not_python_ops(hadamard):
    x, w = _operands(512, 768, 1024, torch.bfloat16, 6, device="cuda")
    x.requires_grad_(True)
    y, grad_w, code = _compiled_linear_code(x, w, {"format": "fp8_e4m3", "hadamard": hadamard})
    assert "halo.quantized_linear" not in code and "halo.scaled_matmul" not in code
    assert _quantize_kernel_mentions(code) >= 6  # 2 operands x 3 matmuls
    assert code.count("_scaled_mm") >= 3
    # No Hadamard, absmax or cast of Inductor's own around the GEMMs: the kernels it generates
    # (named triton_*; ours keep their names) are pointwise (scale arithmetic, the ±1 block of
    # the un-rotation), none a reduction, none storing FP8. The one separate Hadamard is
    # HALO-2's "outer" un-rotation of grad-input's output, a bmm.
    sources = dict(re.findall(r"async_compile\.triton\('(\w+)', '{3}(.*?)'{3}", code,
                              flags=re.DOTALL))
    assert any(name.startswith(ROTATING_QUANTIZE_KERNELS) for name in sources)
    generated = {name: src for name, src in sources.items() if name.startswith("triton_")}
    assert all(name.startswith("triton_poi_") for name in generated), sorted(generated)
    assert not any("float8" in src for src in generated.values())
    assert (code.count("bmm(") > 0) == (hadamard == "halo2")
    # The forward GEMM accumulates fast (option fast_accum, on by default), the gradients' not.
    assert code.count("use_fast_accum=True") == 1 and code.count("use_fast_accum=False") == 2
    # Same numbers as the op's eager CUDA body, which runs the same kernels.
    with torch.no_grad():
        rotations = {"none": ("none",) * 3, "halo2": ("inner", "outer", "inner"),
                     "all_inner": ("inner",) * 3}[hadamard]
        settings = LinearSettings("fp8_e4m3", "row", *rotations, 256, name="l", fast_accum=True)
        want = torch.ops.halo.quantized_linear(x, w, None, settings.encoded)
    assert _rel(y, want) < 2**-7
    assert torch.isfinite(grad_w).all() and torch.isfinite(x.grad).all()
    raise_pending_nonfinite()


@pytest.mark.gpu
def test_gpu_compiled_backward_quantizes_dy_once_for_both_gradients(monkeypatch):
    """HALO-2 with grad-weight rotated too: the compiled backward quantizes each dY with the
    dual kernel, and its gradients are the eager op's, which quantizes dY twice apart."""
    import halo_compile.kernels.triton_hadamard_quantize as kernel

    duals = []
    impl = kernel._hadamard_quantize_impl

    def counting_impl(*args, dual=False, **kwargs):
        duals.append(dual)
        return impl(*args, dual=dual, **kwargs)

    monkeypatch.setattr(kernel, "_hadamard_quantize_impl", counting_impl)
    x, w = _operands(4096, 512, 768, torch.bfloat16, 7, device="cuda")
    x.requires_grad_(True)
    rotations = {"forward": "inner", "grad_input": "outer", "grad_weight": "inner"}
    with torch._inductor.config.patch(force_disable_caches=True):  # traced, not from a cache
        y, grad_w, _ = _compiled_linear_code(x, w, {"format": "fp8_e4m3",
                                                    "hadamard": rotations})
    assert any(duals)  # traced: the dual op's body ran
    xe, we = x.detach().clone().requires_grad_(), w.clone().requires_grad_()
    settings = LinearSettings("fp8_e4m3", "row", "inner", "outer", "inner", 256, "nearest", True,
                              "l", True)
    want = torch.ops.halo.quantized_linear(xe, we, None, settings.encoded)
    want.backward(torch.ones_like(want))
    for got, expected in ((y, want), (x.grad, xe.grad), (grad_w, we.grad)):
        assert _rel(got, expected) < 2**-7
    raise_pending_nonfinite()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_gpu_stochastic_grad_rounding_stays_in_the_fused_kernels(fmt):
    """grad_rounding="stochastic": dY is rounded at random inside the quantize kernels (no
    Python op left in the backward), the gradients are as close to float64 as with nearest
    rounding, and two steps draw different numbers."""
    x, w = _operands(1024, 768, 512, torch.bfloat16, 9, device="cuda")
    dy, _ = _operands(1024, 1, 768, torch.bfloat16, 10, device="cuda")  # outlier channels
    options = {"format": fmt, "hadamard": "halo2"}
    grads = {}
    for rounding in ("nearest", "stochastic", "stochastic"):
        xr = x.clone().requires_grad_(True)
        torch._dynamo.reset()
        y, grad_w, code = _compiled_linear_code(xr, w, {**options, "grad_rounding": rounding},
                                                dy)
        assert "halo.quantized_linear" not in code and "halo.scaled_matmul" not in code
        assert code.count("_transpose_quantize_kernel") >= 2  # dYᵀ's two launches
        grads.setdefault(rounding, []).append((xr.grad, grad_w))
    exact_x = dy.double() @ w.double()
    exact_w = dy.double().t() @ x.double()
    (near_x, near_w), = grads["nearest"]
    (sr_x, sr_w), (sr_x2, _) = grads["stochastic"]
    assert not torch.equal(sr_x, sr_x2)
    assert _rel(sr_x, exact_x) < 1.5 * _rel(near_x, exact_x) + 1e-3
    assert _rel(sr_w, exact_w) < 1.5 * _rel(near_w, exact_w) + 1e-3
    raise_pending_nonfinite()


@pytest.mark.gpu
def test_gpu_generated_code_int8_launches_the_triton_gemm():
    """INT8: Inductor emits the INT8 GEMM (scales in its epilogue) next to the quantize kernels."""
    x, w = _operands(300, 256, 512, torch.bfloat16, 8, device="cuda")
    x.requires_grad_(True)
    y, _, code = _compiled_linear_code(x, w, {"format": "int8", "hadamard": "halo2"})
    assert "halo.int8_scaled_mm" not in code and "_int_mm" not in code
    assert code.count("_int8_scaled_mm_kernel") >= 3
    assert _quantize_kernel_mentions(code) >= 6
    with torch.no_grad():
        settings = LinearSettings("int8", "row", "inner", "outer", "inner", 256, "nearest", True,
                                  "l", False)
        want = torch.ops.halo.quantized_linear(x, w, None, settings.encoded)
    assert _rel(y, want) < 2**-7


@pytest.mark.gpu
def test_gpu_generated_code_keeps_the_deferred_check():
    x, w = _operands(256, 256, 512, torch.bfloat16, 7, device="cuda")
    _, _, code = _compiled_linear_code(x, w, {"format": "fp8_e4m3", "hadamard": "halo2"})
    # One report per graph (forward, backward: passes/batch_nonfinite_checks.py), no Python op
    # call per matmul.
    assert code.count("torch.ops.halo.report_nonfinite.default(") == 2
    assert "torch.ops.halo.checked_scale" not in code
    _, _, code = _compiled_linear_code(x, w, {"format": "fp8_e4m3", "hadamard": "halo2",
                                              "nonfinite": "propagate"})
    assert "halo.report_nonfinite" not in code and "halo.checked_scale" not in code
    x[0, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match="forward"):
        _compiled_linear_code(x, w, {"format": "fp8_e4m3", "hadamard": "halo2"})
        raise_pending_nonfinite()


def test_functionalization_rule_decomposes_and_traces_the_nested_triton_op():
    """The mechanism, on the CPU: a rule registered as halo's ops register theirs replaces the op
    in AOTAutograd's graph, and the triton_op it calls is traced through in turn (on CUDA into
    its kernel, here into its reference), so neither is left as an opaque call."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from halo_compile.kernels.inductor_decompositions import _register

    @torch.library.custom_op("halo_test::quantized_copy", mutates_args=())
    def quantized_copy(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @quantized_copy.register_fake
    def _(x):
        return torch.empty_like(x)

    def decomposition(x):
        q, s = torch.ops.halo.hadamard_quantize(x, "fp8_e4m3", "row", 16, 1)
        return q.float() * s

    _register(quantized_copy, decomposition)
    graphs = []

    def capture(gm, _):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    x = torch.randn(8, 32)
    out = torch.compile(lambda t: torch.ops.halo_test.quantized_copy(t),
                        backend=aot_autograd(fw_compiler=capture), fullgraph=True)(x)
    q, s = torch.ops.halo.hadamard_quantize(x, "fp8_e4m3", "row", 16, 1)
    assert torch.equal(out, q.float() * s)  # the decomposition ran, not the op's clone
    assert "halo_test" not in graphs[0] and "hadamard_quantize" not in graphs[0]


class _QKV(torch.nn.Module):
    """Three linears reading one activation, as q/k/v do."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(64, 48, bias=False) for _ in range(3))

    def forward(self, x):
        h = x * 1.5  # the shared activation (a norm's output in a real layer)
        return self.q(h) + self.k(h) - self.v(h)


def test_linears_reading_one_activation_quantize_it_once(monkeypatch):
    """Traced on the CPU as on CUDA (the device test patched): q/k/v's shared input is rotated
    and quantized once in the forward and its transpose once in the backward, and the result is
    the reference's."""
    import halo_compile.kernels.inductor_decompositions as decompositions
    import halo_compile.kernels.triton_hadamard_quantize as kernel

    calls = []
    reference_body = kernel.hadamard_quantize_reference  # what the op runs off CUDA

    def counting_quantize(x, *args):
        calls.append(tuple(x.shape))
        return reference_body(x, *args)

    torch.manual_seed(0)
    model, x = _QKV(), torch.randn(32, 64)
    options = {"format": "fp8_e4m3", "hadamard": "halo2", "compiler": "aot_eager",
               "min_features": 16}
    reference = copy.deepcopy(model)
    want = torch.compile(reference, backend="halo", options=options)(x)
    want.sum().backward()

    torch._dynamo.reset()  # same code: compile the patched path afresh
    monkeypatch.setattr(decompositions, "fused_device", lambda t: True)
    monkeypatch.setattr(kernel, "hadamard_quantize_reference", counting_quantize)
    got = torch.compile(model, backend="halo", options=options)(x)
    got.sum().backward()
    # Per trace (AOTAutograd may trace the forward more than once): X [32, 64] once against the
    # three weights [48, 64], Xᵀ [64, 32] once against the three dYᵀ [48, 32].
    assert calls.count((32, 64)) >= 1 and calls.count((64, 32)) >= 1
    assert calls.count((48, 64)) == 3 * calls.count((32, 64))
    assert calls.count((48, 32)) == 3 * calls.count((64, 32))
    assert _rel(got, want) < 1e-5
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=False):
        assert _rel(mine.grad, theirs.grad) < 1e-5


@pytest.mark.parametrize("grad_weight", ["inner", "none"])
def test_grad_input_and_grad_weight_quantize_dy_in_one_call(monkeypatch, grad_weight):
    """With grad-input rotated along the tokens ("outer") and grad-weight rotated along them
    too: each linear's dY is quantized for both by one dual call, traced on the CPU as on CUDA,
    and the gradients are the separate quantizations'. With grad-weight not rotated, apart."""
    import halo_compile.kernels.inductor_decompositions as decompositions
    import halo_compile.kernels.triton_hadamard_quantize as kernel

    calls, dual_calls = [], []
    reference_body = kernel.hadamard_quantize_reference  # what the ops run off CUDA
    dual_body = kernel.hadamard_quantize_dual_reference

    def counting_quantize(x, *args):
        calls.append(tuple(x.shape))
        return reference_body(x, *args)

    def counting_dual(x, *args):
        dual_calls.append((tuple(x.shape), *args))
        return dual_body(x, *args)

    torch.manual_seed(0)
    model, x = _QKV(), torch.randn(32, 64, requires_grad=True)
    options = {"format": "fp8_e4m3", "compiler": "aot_eager", "min_features": 16,
               "hadamard": {"forward": "inner", "grad_input": "outer",
                            "grad_weight": grad_weight}}
    reference, x_ref = copy.deepcopy(model), x.detach().clone().requires_grad_()
    torch.compile(reference, backend="halo", options=options)(x_ref).sum().backward()

    torch._dynamo.reset()  # same code: compile the patched path afresh
    monkeypatch.setattr(decompositions, "fused_device", lambda t: True)
    monkeypatch.setattr(kernel, "hadamard_quantize_reference", counting_quantize)
    monkeypatch.setattr(kernel, "hadamard_quantize_dual_reference", counting_dual)
    torch.compile(model, backend="halo", options=options)(x).sum().backward()
    # The 32 tokens zero-padded to the token block, 256, for the rotations along them.
    if grad_weight == "inner":  # the three padded dY [256, 48]: one dual call each
        assert dual_calls == [((256, 48), "fp8_e4m3", 256, "nearest")] * 3
        assert (48, 256) not in calls and (48, 32) not in calls
    else:  # padded dY [256, 48] along dim 0, and dYᵀ [48, 32] unpadded: three each
        assert not dual_calls and calls.count((256, 48)) == calls.count((48, 32)) == 3
    assert _rel(x.grad, x_ref.grad) < 1e-6
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=False):
        assert _rel(mine.grad, theirs.grad) < 1e-6


@pytest.mark.parametrize("grad_weight", ["inner", "none"])
def test_stochastic_grad_rounding_reaches_the_kernels_of_dy(monkeypatch, grad_weight):
    """grad_rounding="stochastic", traced on the CPU as on CUDA: the quantize ops of dY (dual or
    apart) are asked to round stochastically, those of X and W to nearest."""
    import halo_compile.kernels.inductor_decompositions as decompositions
    import halo_compile.kernels.triton_hadamard_quantize as kernel

    roundings = {}
    reference_body = kernel.hadamard_quantize_reference
    dual_body = kernel.hadamard_quantize_dual_reference

    def recording_quantize(x, fmt, granularity, block, dim, rounding):
        roundings.setdefault(tuple(x.shape), set()).add(rounding)
        return reference_body(x, fmt, granularity, block, dim, rounding)

    def recording_dual(x, fmt, block, rounding):
        roundings.setdefault(("dual", *x.shape), set()).add(rounding)
        return dual_body(x, fmt, block, rounding)

    monkeypatch.setattr(decompositions, "fused_device", lambda t: True)
    monkeypatch.setattr(kernel, "hadamard_quantize_reference", recording_quantize)
    monkeypatch.setattr(kernel, "hadamard_quantize_dual_reference", recording_dual)
    torch._dynamo.reset()
    model, x = _QKV(), torch.randn(32, 64, requires_grad=True)
    options = {"format": "int8", "compiler": "aot_eager", "min_features": 16,
               "grad_rounding": "stochastic",
               "hadamard": {"forward": "inner", "grad_input": "outer",
                            "grad_weight": grad_weight}}
    torch.compile(model, backend="halo", options=options)(x).sum().backward()
    dy_keys = {("dual", 256, 48)} if grad_weight == "inner" else {(256, 48), (48, 32)}  # padded
    assert {k for k, r in roundings.items() if r == {"stochastic"}} == dy_keys
    assert all(r == {"nearest"} for k, r in roundings.items() if k not in dy_keys)
    assert (32, 64) in roundings and (48, 64) in roundings  # X and W


def test_cached_weights_through_inductor_as_on_cuda(monkeypatch):
    """Option cache_weights, traced on the CPU as on CUDA (the device test patched) and compiled
    by Inductor, which asserts the strides the cached weight op's fake promises: two optimizer
    steps of two micro-batches give the gradients of the uncached path, and each weight is
    quantized twice a step (W for the forward, Wᵀ for grad-input), served from the cache in the
    second micro-batch."""
    import halo_compile.kernels.inductor_decompositions as decompositions
    from halo_compile.kernels.weight_cache import WEIGHT_CACHE

    monkeypatch.setattr(decompositions, "fused_device", lambda t: True)
    torch.manual_seed(0)
    inputs = [torch.randn(32, 64) for _ in range(4)]
    options = {"format": "fp8_e4m3", "hadamard": "halo2", "min_features": 16}
    grads, counts = {}, []
    for cache in (False, True):
        torch._dynamo.reset()
        WEIGHT_CACHE.forget()
        torch.manual_seed(1)
        model = _QKV()
        compiled = torch.compile(model, backend="halo", options={**options,
                                                                 "cache_weights": cache})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            before = WEIGHT_CACHE.computations
            for x in inputs[2 * step:2 * step + 2]:
                x = x.clone().requires_grad_()
                compiled(x).sum().backward()
            counts.append(WEIGHT_CACHE.computations - before)
            # The second step's gradients: from the updated weights, not stale cached ones.
            grads.setdefault(cache, []).extend([p.grad.clone() for p in model.parameters()]
                                               + [x.grad])
            optimizer.step()
            optimizer.zero_grad()
    assert counts == [0, 0, 6, 6] and len(grads[True]) == len(grads[False]) == 8
    for mine, theirs in zip(grads[True], grads[False], strict=False):
        assert _rel(mine, theirs) < 1e-6
