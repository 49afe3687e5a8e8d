"""merge_unrotations: gradients summed before their "outer" rotation is undone, once.

Snapshots: `EXPECTTEST_ACCEPT=1 pytest tests/passes/test_merge_unrotations.py` rewrites them.
"""

import copy

import expecttest
import pytest
import torch
from test_quantize_linears import normalize_code
from torch.fx.experimental.proxy_tensor import make_fx

from halo_compile.kernels.hadamard import sylvester_signs
from halo_compile.kernels.scaled_matmul import unrotate_rows
from halo_compile.passes.merge_unrotations import merge_unrotations

BLOCK = 16


def grad_inputs_of_three_linears(dy_q, dy_k, dy_v, w_q, w_k, w_v):
    """What q/k/v's decomposed grad-inputs leave for Inductor, the quantization left out: each
    GEMM's output [T, in] un-rotated along the tokens, reshaped to the activation's shape, and
    the three added by autograd."""
    signs = sylvester_signs(BLOCK, dy_q.dtype)
    grads = [unrotate_rows(dy @ w, BLOCK, lambda *_: signs).reshape(1, *dy.shape[:1], -1)
             for dy, w in ((dy_q, w_q), (dy_k, w_k), (dy_v, w_v))]
    return grads[0] + grads[1] + grads[2]


def _inputs(seed, dtype=torch.float32, tokens=64):
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(tokens, n, generator=g) for n in (48, 32, 32)]
    ws = [torch.randn(n, 40, generator=g) for n in (48, 32, 32)]
    return [t.to(dtype) for t in dys + ws]


def _traced(fn, *inputs):
    """As a post-grad graph has it: make_fx's traces keep dead nodes, which Inductor drops."""
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    gm.graph.eliminate_dead_code()
    return gm


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


class TestMergeUnrotations(expecttest.TestCase):
    def test_graph_rewrite(self):
        gm = _traced(grad_inputs_of_three_linears, *_inputs(0))
        self.assertEqual(merge_unrotations(gm.graph), 2)
        gm.graph.lint()
        gm.recompile()
        self.assertEqual(_count(gm, torch.ops.aten.bmm.default), 1)
        code = normalize_code(gm.code)
        self.assertExpectedInline(code[code.index("mm = "):], """\
mm = torch.ops.aten.mm.default(dy_q_1, w_q_1)
expand = torch.ops.aten.expand.default(_to_copy, [4, 16, 16])
view_1 = torch.ops.aten.view.default(expand, [4, 16, 16])
mm_1 = torch.ops.aten.mm.default(dy_k_1, w_k_1)
mm_2 = torch.ops.aten.mm.default(dy_v_1, w_v_1)
add_tensor = torch.ops.aten.add.Tensor(mm, mm_1)
add_tensor_1 = torch.ops.aten.add.Tensor(add_tensor, mm_2)
view_default_2 = torch.ops.aten.view.default(add_tensor_1, [-1, 16, 40])
bmm_default_1 = torch.ops.aten.bmm.default(view_1, view_default_2)
view_default_3 = torch.ops.aten.view.default(bmm_default_1, [1, 64, -1])
return view_default_3""")


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_graph_computes_the_same_sum(dtype, bound, seed):
    """Against float64: the merged graph's error is the separate un-rotations' (one rounding of
    the sum instead of one per product)."""
    inputs = _inputs(seed, dtype)
    gm = _traced(grad_inputs_of_three_linears, *inputs)
    assert merge_unrotations(gm.graph) == 2
    gm.recompile()
    exact = grad_inputs_of_three_linears(*[t.double() for t in inputs])
    for got in (gm(*inputs), grad_inputs_of_three_linears(*inputs)):
        assert ((got.double() - exact).norm() / exact.norm()).item() < bound


def test_unrotation_with_another_user_is_left_alone():
    """A product whose result is also used elsewhere would still be computed: no gain."""
    def kept(*inputs):
        signs = sylvester_signs(BLOCK, inputs[0].dtype)
        a, b = (unrotate_rows(dy @ w, BLOCK, lambda *_: signs)
                for dy, w in ((inputs[0], inputs[3]), (inputs[1], inputs[4])))
        return a + b, a

    gm = _traced(kept, *_inputs(0))
    assert merge_unrotations(gm.graph) == 0


def test_products_by_a_graph_input_are_left_alone():
    """Batched products by the same tensor that is not halo's constant ±1 block: the user's own
    math, not rewritten."""
    def users_bmm(dy_q, dy_k, w_q, w_k, s):
        return (unrotate_rows(dy_q @ w_q, BLOCK, lambda *_: s)
                + unrotate_rows(dy_k @ w_k, BLOCK, lambda *_: s))

    dy_q, dy_k, _, w_q, w_k, _ = _inputs(0)
    gm = _traced(users_bmm, dy_q, dy_k, w_q, w_k, torch.randn(BLOCK, BLOCK))
    assert merge_unrotations(gm.graph) == 0


def test_different_blocks_are_left_alone():
    def two_blocks(dy_q, dy_k, w_q, w_k):
        return (unrotate_rows(dy_q @ w_q, 16, lambda b, *_: sylvester_signs(b, dy_q.dtype))
                + unrotate_rows(dy_k @ w_k, 32, lambda b, *_: sylvester_signs(b, dy_q.dtype)))

    dy_q, dy_k, _, w_q, w_k, _ = _inputs(0)
    gm = _traced(two_blocks, dy_q, dy_k, w_q, w_k)
    assert merge_unrotations(gm.graph) == 0


class _QKV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(64, 48, bias=False) for _ in range(3))

    def forward(self, x):
        return self.q(x) + self.k(x) * 0.5 - self.v(x)


def test_compiled_backward_unrotates_the_summed_gradient_once(monkeypatch):
    """Through the backend and Inductor, traced on the CPU as on CUDA (the device test patched):
    halo2's three grad-inputs of q/k/v are un-rotated once, and x's gradient is the one
    computed without the decomposition."""
    import halo_compile.kernels.inductor_decompositions as decompositions
    import halo_compile.passes.post_grad as post_grad

    torch.manual_seed(0)
    model, x = _QKV(), torch.randn(32, 64, requires_grad=True)
    options = {"format": "fp8_e4m3", "hadamard": "halo2", "min_features": 16}
    reference, x_ref = copy.deepcopy(model), x.detach().clone().requires_grad_()
    torch.compile(reference, backend="halo", options=options)(x_ref).sum().backward()

    removed = []
    monkeypatch.setattr(post_grad, "merge_unrotations",
                        lambda graph: removed.append(merge_unrotations(graph)))
    monkeypatch.setattr(decompositions, "fused_device", lambda t: True)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # the passes run
        torch.compile(model, backend="halo", options=options)(x).sum().backward()
    assert removed == [0, 2]  # forward, backward
    assert ((x.grad - x_ref.grad).norm() / x_ref.grad.norm()).item() < 1e-5
