"""Bad options and awkward inputs: a clear error or a documented fallback, never a silent NaN or a
silently wrong result."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halo_compile
from halo_compile import NonFiniteInputError
from halo_compile.kernels.settings import MatmulSettings

FAST = {"compiler": "aot_eager", "min_features": 16}


class MLP(nn.Module):
    def __init__(self, d_in=64, d_hidden=128, d_out=64, dtype=None):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, dtype=dtype)
        self.down = nn.Linear(d_hidden, d_out, dtype=dtype)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def compile_halo(model, options):
    return torch.compile(model, backend="halo", options=options)


def find_in_chain(exc, cls):
    """The first exception of type `cls` in exc, its __cause__ / __context__ chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, cls):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# --------------------------------------------------------------------------------------------
# Bad options through torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"fromat": "int8"}, ["'fromat'", "'format'"]),
        ({"format": "fp4"}, ["'format'", "'fp4'", "'int8'"]),
        ({"hadamard_block": 100}, ["'hadamard_block'", "100", "'full'"]),
        ({"layers": {"*.down": {"scael": "row"}}}, ["'scael'", "'*.down'"]),
    ],
)
def test_bad_option_via_torch_compile(options, expected):
    compiled = compile_halo(MLP(), {**options, "compiler": "aot_eager"})
    # torch.compile is lazy: the backend (and its option check) runs on the first call, and
    # Dynamo wraps what the backend raises.
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 64))
    assert isinstance(info.value, (ValueError, torch._dynamo.exc.BackendCompilerFailed))
    message = str(info.value)
    assert "ValueError" in message or isinstance(info.value, ValueError)
    for text in expected:
        assert text in message, message


# --------------------------------------------------------------------------------------------
# Linears the GEMMs cannot take stay in high precision, with the reason in the report
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_unaligned_linear_stays_high_precision(seed):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("odd", nn.Linear(17, 64))
    model.add_module("act", nn.GELU())
    model.add_module("proj", nn.Linear(64, 64))
    ref = copy.deepcopy(model)
    compiled = compile_halo(model, {"format": "fp8_e4m3", **FAST})

    x = torch.randn(4, 8, 17)
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    out = compiled(x)
    out.square().sum().backward()
    ref_out = ref(x_ref)
    ref_out.square().sum().backward()

    report = halo_compile.report(compiled)
    odd = report["odd"]
    assert not odd.quantized
    assert "in_features=17" in odd.reason and "16" in odd.reason
    assert report["proj"].quantized  # the aligned layer is still quantized
    assert "high precision" in str(report) and "in_features=17" in str(report)

    # The output went through the FP8 "proj", so it is close to eager, not equal (the test
    # below checks that a lone unaligned layer is exactly eager).
    assert 1e-4 < rel_err(out, ref_out) < 0.1
    assert rel_err(model.proj.weight.grad, ref.proj.weight.grad) < 0.2


def test_unaligned_linear_alone_is_exactly_eager():
    """A model whose only linear cannot be quantized computes exactly what eager does."""
    torch.manual_seed(2)
    for shape in ((17, 64), (64, 24)):
        torch._dynamo.reset()
        model = nn.Sequential(nn.Linear(*shape))
        ref = copy.deepcopy(model)
        compiled = compile_halo(model, {"format": "fp8_e4m3", **FAST})
        x = torch.randn(3, 5, shape[0])
        out = compiled(x)
        out.square().sum().backward()
        ref_out = ref(x)
        ref_out.square().sum().backward()
        assert rel_err(out, ref_out) < 1e-6
        assert rel_err(model[0].weight.grad, ref[0].weight.grad) < 1e-6
        assert rel_err(model[0].bias.grad, ref[0].bias.grad) < 1e-6
        layer = halo_compile.report(compiled)["0"]
        assert not layer.quantized
        which = "in_features=17" if shape[0] == 17 else "out_features=24"
        assert which in layer.reason, layer.reason


def test_below_min_features_reason():
    torch.manual_seed(3)
    model = MLP(64, 32, 64)
    compiled = compile_halo(model, {"compiler": "aot_eager", "min_features": 64})
    compiled(torch.randn(2, 4, 64))
    report = halo_compile.report(compiled)
    for name in ("up", "down"):
        assert not report[name].quantized
        assert report[name].reason == "smaller than min_features=64"


def test_excluded_linear_reason_names_the_pattern():
    torch.manual_seed(4)
    model = nn.Sequential()
    model.add_module("block", MLP())
    ref = copy.deepcopy(model)
    compiled = compile_halo(model, {"format": "none", "layers": {"*.down": None}, **FAST})
    x = torch.randn(2, 8, 64)
    out = compiled(x)
    report = halo_compile.report(compiled)
    assert report["block.up"].quantized
    down = report["block.down"]
    assert not down.quantized
    assert "'*.down'" in down.reason and "excluded" in down.reason
    assert rel_err(out, ref(x)) < 1e-5


# --------------------------------------------------------------------------------------------
# inf / NaN: an error naming the layer, or (opt-in) propagation; never a silent finite garbage
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "none"])
def test_nonfinite_input_raises_naming_the_layer(bad, fmt):
    torch.manual_seed(5)
    compiled = compile_halo(MLP(), {"format": fmt, **FAST})
    compiled(torch.randn(2, 8, 64))  # compiles; finite input is fine
    x = torch.randn(2, 8, 64)
    x[1, 3, 7] = bad
    with pytest.raises(Exception) as info:
        compiled(x)
    err = find_in_chain(info.value, NonFiniteInputError)
    assert err is not None, f"expected NonFiniteInputError, got {info.value!r}"
    assert "up forward" in str(err), str(err)
    assert "nonfinite" in str(err)  # tells the user how to opt out


def test_nonfinite_weight_raises_naming_the_layer():
    torch.manual_seed(6)
    model = MLP()
    compiled = compile_halo(model, {"format": "fp8_e4m3", **FAST})
    compiled(torch.randn(2, 8, 64))
    with torch.no_grad():
        model.down.weight[3, 5] = float("inf")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 8, 64))
    err = find_in_chain(info.value, NonFiniteInputError)
    assert err is not None and "down forward" in str(err) and "right operand" in str(err)


def test_nonfinite_gradient_raises_naming_the_layer():
    """A finite forward, then an inf gradient: the backward's quantized matmul raises."""
    torch.manual_seed(7)
    compiled = compile_halo(MLP(), {"format": "fp8_e4m3", **FAST})
    x = torch.randn(2, 8, 64, requires_grad=True)
    out = compiled(x)
    assert torch.isfinite(out).all()
    with pytest.raises(Exception) as info:
        (out * torch.full_like(out, float("inf"))).sum().backward()
    err = find_in_chain(info.value, NonFiniteInputError)
    assert err is not None, repr(info.value)
    assert "down grad-input" in str(err) or "down grad-weight" in str(err), str(err)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_nonfinite_propagate_gives_nonfinite_loss(fmt):
    torch.manual_seed(8)
    model = MLP()
    compiled = compile_halo(model, {"format": fmt, "nonfinite": "propagate", **FAST})
    x = torch.randn(2, 8, 64)
    loss = compiled(x).square().mean()
    assert torch.isfinite(loss)
    x[0, 0, 0] = float("inf")
    loss = compiled(x).square().mean()
    loss.backward()
    assert not torch.isfinite(loss), "inf in the input must not quantize to a finite loss"
    assert not torch.isfinite(model.up.weight.grad).all()


# --------------------------------------------------------------------------------------------
# Dtypes the low-precision GEMMs do not take
# --------------------------------------------------------------------------------------------


def test_float64_model_stays_high_precision_and_exact():
    torch.manual_seed(9)
    model = MLP(dtype=torch.float64)
    ref = copy.deepcopy(model)
    compiled = compile_halo(model, {"format": "fp8_e4m3", **FAST})
    x = torch.randn(2, 8, 64, dtype=torch.float64)
    out = compiled(x)
    out.sum().backward()
    ref_out = ref(x)
    ref_out.sum().backward()
    assert out.dtype == torch.float64
    assert rel_err(out, ref_out) < 1e-12
    assert rel_err(model.up.weight.grad, ref.up.weight.grad) < 1e-12
    report = halo_compile.report(compiled)
    for name in ("up", "down"):
        assert not report[name].quantized
        assert "torch.float64" in report[name].reason


def test_integer_linear_stays_high_precision_and_exact():
    class IntLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randint(-5, 5, (64, 64), dtype=torch.int32),
                                       requires_grad=False)

        def forward(self, x):
            return F.linear(x, self.weight)

    torch.manual_seed(10)
    model = IntLinear()
    compiled = compile_halo(model, FAST)
    x = torch.randint(-5, 5, (4, 64), dtype=torch.int32)
    assert torch.equal(compiled(x), model(x))
    layer = halo_compile.report(compiled).layers[0]
    assert not layer.quantized and "torch.int32" in layer.reason


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_quantized(dtype):
    torch.manual_seed(11)
    model = MLP(dtype=dtype)
    ref = copy.deepcopy(model).float()
    compiled = compile_halo(model, {"format": "fp8_e4m3", **FAST})
    x = torch.randn(2, 8, 64)
    out = compiled(x.to(dtype))
    out.float().sum().backward()
    assert out.dtype == dtype
    assert model.up.weight.grad.dtype == dtype and model.up.bias.grad.dtype == dtype
    ref_out = ref(x)
    ref_out.sum().backward()
    assert 1e-4 < rel_err(out, ref_out) < 0.1
    assert rel_err(model.up.weight.grad, ref.up.weight.grad) < 0.2
    assert all(layer.quantized for layer in halo_compile.report(compiled).layers)


# --------------------------------------------------------------------------------------------
# Empty batches and zero-length sequences: as in eager
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8, 64), (2, 0, 64)], ids=["empty-batch", "empty-sequence"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "none"])
def test_empty_input_matches_eager(shape, fmt):
    torch.manual_seed(12)
    model = MLP()
    ref = copy.deepcopy(model)
    compiled = compile_halo(model, {"format": fmt, **FAST})
    compiled(torch.randn(2, 8, 64)).sum().backward()  # a non-empty step first, as in training
    model.zero_grad()
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = compiled(x)
    ref_out = ref(x_ref)
    assert out.shape == ref_out.shape == (*shape[:-1], 64)
    loss, ref_loss = out.square().sum(), ref_out.square().sum()
    assert loss.item() == ref_loss.item() == 0.0
    loss.backward()
    ref_loss.backward()
    assert x.grad.shape == x_ref.grad.shape == shape
    for name, param in model.named_parameters():
        ref_grad = dict(ref.named_parameters())[name].grad
        assert param.grad is not None and param.grad.shape == ref_grad.shape, name
        assert torch.equal(param.grad, ref_grad) and not param.grad.any(), name
    assert all(layer.quantized for layer in halo_compile.report(compiled).layers)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "none"])
def test_scaled_matmul_of_empty_operands_is_eager_matmul(fmt):
    torch.manual_seed(13)
    for a_shape, b_shape in (((0, 64), (32, 64)), ((16, 64), (0, 64)), ((16, 0), (32, 0))):
        a, b = torch.randn(*a_shape), torch.randn(*b_shape)
        settings = MatmulSettings(fmt, "inner", 256, "row", "nearest", "nearest", True, "empty")
        out = torch.ops.halo.scaled_matmul(a, b, settings.encoded)
        assert torch.equal(out, a @ b.t()), (a_shape, b_shape)
