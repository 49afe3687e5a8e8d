"""batch_nonfinite_checks: the per-matmul `halo::checked_scale` calls of a post-grad graph become
multiplications, and one `halo::report_nonfinite` at the end checks every scale.

Snapshots: `EXPECTTEST_ACCEPT=1 pytest tests/passes/test_batch_nonfinite_checks.py` rewrites them.
"""

import expecttest
import pytest
import torch
from test_quantize_linears import normalize_code
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from halo_compile import NonFiniteInputError
from halo_compile.passes.batch_nonfinite_checks import batch_nonfinite_checks
from halo_compile.passes.post_grad import HaloPostGradPasses


def two_matmuls_sharing_a_left_operand(a, b, c):
    """What the decomposed quantized matmuls leave for Inductor, reduced to the scales: q/k-like
    matmuls reading one activation `a` (one scale tensor, checked by both)."""
    sa = a.abs().amax(1, keepdim=True) / 448.0
    sb = b.abs().amax(1, keepdim=True) / 448.0
    sc = c.abs().amax(1, keepdim=True) / 448.0
    gemm_scale_1 = torch.ops.halo.checked_scale(sa, sb, 1.0, "q forward")
    gemm_scale_2 = torch.ops.halo.checked_scale(sa, sc, 0.0625, "k forward")
    return gemm_scale_1 * sb.t(), gemm_scale_2 * sc.t()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 32, generator=g) + 0.5 for n in (24, 16, 8)]


class TestBatchNonfiniteChecks(expecttest.TestCase):
    def test_graph_rewrite(self):
        gm = make_fx(two_matmuls_sharing_a_left_operand, tracing_mode="fake")(*_inputs(0))
        self.assertEqual(batch_nonfinite_checks(gm.graph), 2)
        gm.recompile()
        self.assertExpectedInline(normalize_code(gm.code), """\
def forward(self, a_1, b_1, c_1):
abs_1 = torch.ops.aten.abs.default(a_1)
amax = torch.ops.aten.amax.default(abs_1, [1], True)
div = torch.ops.aten.div.Tensor(amax, 448.0)
abs_2 = torch.ops.aten.abs.default(b_1)
amax_1 = torch.ops.aten.amax.default(abs_2, [1], True)
div_1 = torch.ops.aten.div.Tensor(amax_1, 448.0)
abs_3 = torch.ops.aten.abs.default(c_1)
amax_2 = torch.ops.aten.amax.default(abs_3, [1], True)
div_2 = torch.ops.aten.div.Tensor(amax_2, 448.0)
mul_tensor = torch.ops.aten.mul.Tensor(div, 0.0625)
t = torch.ops.aten.t.default(div_1)
mul = torch.ops.aten.mul.Tensor(div, t)
t_1 = torch.ops.aten.t.default(div_2)
mul_1 = torch.ops.aten.mul.Tensor(mul_tensor, t_1)
empty_memory_format = torch.ops.aten.empty.memory_format([0], dtype = torch.float32, device = device(type='cpu'))
report_nonfinite_default = torch.ops.halo.report_nonfinite.default(empty_memory_format, [div, div_1, div_2], ['q forward (left operand)', 'q forward (right operand)', 'k forward (right operand)'], False)
return (mul, mul_1)""")

    def test_graph_without_checks_is_left_alone(self):
        gm = make_fx(lambda a: a.abs().amax(1) / 448.0, tracing_mode="fake")(_inputs(1)[0])
        before = gm.code
        self.assertEqual(batch_nonfinite_checks(gm.graph), 0)
        gm.recompile()
        self.assertEqual(gm.code, before)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rewritten_graph_computes_the_same_and_names_the_bad_operand(seed):
    gm = make_fx(two_matmuls_sharing_a_left_operand, tracing_mode="fake")(*_inputs(seed))
    batch_nonfinite_checks(gm.graph)
    gm.recompile()
    inputs = _inputs(seed)
    for got, want in zip(gm(*inputs), two_matmuls_sharing_a_left_operand(*inputs), strict=False):
        assert torch.equal(got, want)
    inputs[2][3, 4] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"k forward \(right operand\)"):
        gm(*inputs)
    inputs = _inputs(seed)
    inputs[0][0, 0] = float("inf")  # the shared operand: named after its first matmul
    with pytest.raises(NonFiniteInputError, match=r"q forward \(left operand\)"):
        gm(*inputs)


def test_inductor_runs_it_as_a_post_grad_pass():
    """Through Inductor (CPU here; the backend installs it the same way on CUDA, where the
    decomposed matmuls are what emit checked_scale): one report call in the generated code, no
    checked_scale call, the same numbers, the same error."""
    seen = []
    compiled = torch.compile(two_matmuls_sharing_a_left_operand, options={
        "post_grad_custom_post_pass": HaloPostGradPasses(then=seen.append)})
    inputs = _inputs(3)
    out, code = run_and_get_code(compiled, *inputs)
    code = "\n".join(code)
    assert code.count("torch.ops.halo.report_nonfinite.default(") == 1
    assert "torch.ops.halo.checked_scale" not in code
    assert len(seen) == 1  # the chained pass ran after ours
    for got, want in zip(out, two_matmuls_sharing_a_left_operand(*inputs), strict=False):
        torch.testing.assert_close(got, want)
    inputs[1][0, 1] = float("-inf")
    with pytest.raises(NonFiniteInputError, match=r"q forward \(right operand\)"):
        compiled(*inputs)
