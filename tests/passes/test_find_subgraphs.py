"""Linears inside higher-order-op subgraphs: a checkpointed region is rewritten like the outer
graph (snapshot), its backward recomputes the same halo ops and saves less than without
checkpointing, and the linears of a subgraph halo does not rewrite are reported with the reason.

Snapshots: `EXPECTTEST_ACCEPT=1 pytest tests/passes/test_find_subgraphs.py` rewrites them.
"""

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_quantize_linears import QL, call_nodes, compile_with_passes, format_dynamo_graph
from torch.utils.checkpoint import checkpoint

from halo_compile.kernels.settings import LinearSettings


class Block(nn.Module):
    def __init__(self, dim=64, hidden=128):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class CheckpointedBlock(nn.Module):
    def __init__(self, use_checkpoint=True, dim=64, hidden=128):
        super().__init__()
        self.block = Block(dim, hidden)
        self.head = nn.Linear(dim, dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        if self.use_checkpoint:
            x = checkpoint(self.block, x, use_reentrant=False)
        else:
            x = self.block(x)
        return self.head(x)


def subgraph_modules(gm):
    return [getattr(gm, n.target) for n in gm.graph.nodes
            if n.op == "get_attr" and isinstance(getattr(gm, n.target), torch.fx.GraphModule)]


def saved_activation_bytes(fw):
    """Bytes of what the AOT forward graph saves for the backward, beyond its own inputs (the
    parameters and the model input, which live anyway)."""
    inputs = {n for n in fw.graph.nodes if n.op == "placeholder"}
    output, = [n for n in fw.graph.nodes if n.op == "output"]
    saved = [n for n in output.args[0][1:] if isinstance(n, torch.fx.Node) and n not in inputs]
    return sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in saved)


class TestCheckpointedRegion(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.x = torch.randn(2, 8, 64, requires_grad=True)

    def test_rewritten_graph_of_a_checkpointed_block(self):
        compiled, state = compile_with_passes(CheckpointedBlock(), {"format": "fp8_e4m3"},
                                              aot=False)
        compiled(self.x)
        gm, ctx = state["gm"], state["ctx"]
        body, = subgraph_modules(gm)
        self.assertEqual([(r.fqn, r.quantized) for r in ctx.layer_reports],
                         [("head", True), ("block.fc1", True), ("block.fc2", True)])
        self.assertExpectedInline(state["graph_text"], """\
input x
input block.fc1.weight
input block.fc1.bias
input block.fc2.weight
input block.fc2.bias
input head.weight
input head.bias
wrap_body_0 = wrap_body_0()
tag_activation_checkpoint = tag_activation_checkpoint(wrap_body_0, x, block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias, use_reentrant=False)
x = getitem(tag_activation_checkpoint, 0)
quantized_linear_default = halo.quantized_linear.default(x, head.weight, head.bias, '{"format":"fp8_e4m3","granularity":"row","forward_rotation":"inner","grad_input_rotation":"outer","grad_weight_rotation":"none","max_block":256,"grad_rounding":"nearest","check_finite":true,"name":"head","fast_accum":true,"cache_weight":false}')
return (quantized_linear_default,)""")
        self.assertExpectedInline(format_dynamo_graph(body), """\
input l_x_
input l_self_modules_block_modules_fc1_parameters_weight_
input l_self_modules_block_modules_fc1_parameters_bias_
input l_self_modules_block_modules_fc2_parameters_weight_
input l_self_modules_block_modules_fc2_parameters_bias_
quantized_linear_default = halo.quantized_linear.default(l_x_, l_self_modules_block_modules_fc1_parameters_weight_, l_self_modules_block_modules_fc1_parameters_bias_, '{"format":"fp8_e4m3","granularity":"row","forward_rotation":"inner","grad_input_rotation":"outer","grad_weight_rotation":"none","max_block":256,"grad_rounding":"nearest","check_finite":true,"name":"block.fc1","fast_accum":true,"cache_weight":false}')
gelu = gelu(quantized_linear_default)
quantized_linear_default_1 = halo.quantized_linear.default(gelu, l_self_modules_block_modules_fc2_parameters_weight_, l_self_modules_block_modules_fc2_parameters_bias_, '{"format":"fp8_e4m3","granularity":"row","forward_rotation":"inner","grad_input_rotation":"outer","grad_weight_rotation":"none","max_block":256,"grad_rounding":"nearest","check_finite":true,"name":"block.fc2","fast_accum":true,"cache_weight":false}')
return (quantized_linear_default_1,)""")

    def test_backward_recomputes_the_same_halo_ops(self):
        compiled, state = compile_with_passes(CheckpointedBlock(), {"format": "fp8_e4m3"})
        compiled(self.x).sum().backward()
        fw, bw = state["fw"], state["bw"]

        def block_ops(graph):
            # The call's settings: everything but the input activation and the parameters.
            settings = [LinearSettings.decode(n.args[3]) for n in call_nodes(graph, QL)]
            return [s for s in settings if s.name.startswith("block.")]

        self.assertEqual([s.name for s in block_ops(fw)], ["block.fc1", "block.fc2"])
        self.assertEqual(block_ops(bw), block_ops(fw))
        # Both recomputed halo ops read the same parameters as in the forward.
        fw_params = [n.args[1].name for n in call_nodes(fw, QL)][:2]
        self.assertEqual([n.args[1].name for n in call_nodes(bw, QL)][:2], fw_params)

    def test_checkpointing_saves_fewer_activation_bytes(self):
        saved = {}
        for use_checkpoint in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = CheckpointedBlock(use_checkpoint, dim=64, hidden=512)
            compiled, state = compile_with_passes(model, {"format": "fp8_e4m3"})
            compiled(self.x).sum().backward()
            self.assertEqual(len(call_nodes(state["fw"], QL)), 3)
            saved[use_checkpoint] = saved_activation_bytes(state["fw"])
        # Without checkpointing the forward saves fc1's [16, 512] output and its GELU at least.
        self.assertGreaterEqual(saved[False], 2 * 16 * 512 * 4)
        self.assertLess(saved[True], saved[False] / 4)


class TestSubgraphNames(expecttest.TestCase):
    def test_closure_and_functional_linears_are_named_after_the_model(self):
        class Closure(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 64)
                self.proj = nn.Parameter(torch.randn(64, 64) / 8)

            def forward(self, x):
                # A closure over `s` (not `self`), and a functional linear with no module.
                s = self
                return checkpoint(lambda y: F.linear(s.fc(y).relu(), s.proj), x,
                                  use_reentrant=False)

        torch.manual_seed(0)
        compiled, state = compile_with_passes(Closure(), {"format": "fp8_e4m3"}, aot=False)
        compiled(torch.randn(4, 64, requires_grad=True))
        reports = state["ctx"].layer_reports
        self.assertEqual([(r.fqn, r.quantized) for r in reports], [("fc", True), ("proj", True)])


class TwoLinears(torch.autograd.Function):
    """y = (x W1ᵀ) W2ᵀ with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        h = F.linear(x, w1)
        ctx.save_for_backward(x, w1, w2, h)
        return F.linear(h, w2)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, h = ctx.saved_tensors
        grad_h = grad @ w2
        flat = lambda t: t.flatten(0, -2)  # noqa: E731
        return (grad_h @ w1, flat(grad_h).t() @ flat(x), flat(grad).t() @ flat(h))


class Region(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    @torch.compiler.nested_compile_region
    def forward(self, x):
        return self.fc(x).relu()


class TestSubgraphsHaloDoesNotRewrite(expecttest.TestCase):
    def test_custom_autograd_function_linears_are_reported_not_rewritten(self):
        class WithFunction(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 64, bias=False)
                self.small = nn.Linear(64, 8, bias=False)

            def forward(self, x):
                return TwoLinears.apply(x, self.fc.weight, self.small.weight)

        torch.manual_seed(0)
        compiled, state = compile_with_passes(WithFunction(), {"format": "fp8_e4m3"}, aot=False)
        compiled(torch.randn(4, 64, requires_grad=True))
        report = {r.fqn: r for r in state["ctx"].layer_reports}
        # The hand-written backward would not match a quantized forward: left alone, and said so.
        self.assertEqual(set(report), {"fc", "small"})
        self.assertFalse(report["fc"].quantized)
        self.assertEqual(report["fc"].reason,
                         "inside a autograd_function_apply subgraph, which halo does not rewrite")
        # A linear halo would not quantize anyway keeps its own reason.
        self.assertFalse(report["small"].quantized)
        self.assertEqual(report["small"].reason,
                         "out_features=8 is not a multiple of 16 (GEMM alignment)")
        for body in subgraph_modules(state["gm"]):
            self.assertEqual(call_nodes(body, QL), [])

    def test_subgraph_shared_by_several_calls_is_reported_per_call(self):
        class TwoRegions(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList([Region(), Region()])

            def forward(self, x):
                return self.blocks[1](self.blocks[0](x))

        torch.manual_seed(0)
        compiled, state = compile_with_passes(TwoRegions(), {"format": "fp8_e4m3"}, aot=False)
        compiled(torch.randn(4, 64, requires_grad=True))
        reports = state["ctx"].layer_reports
        self.assertEqual([site.hop for site in state["ctx"].analysis.subgraphs],
                         ["invoke_subgraph"] * 2)
        self.assertEqual([(r.fqn, r.quantized) for r in reports],
                         [("blocks.0.fc", False), ("blocks.1.fc", False)])
        self.assertIn("invoke_subgraph subgraph shared by 2 calls", reports[0].reason)
        self.assertEqual(call_nodes(subgraph_modules(state["gm"])[0], QL), [])

    def test_rotate_fused_does_not_enter_subgraphs(self):
        torch.manual_seed(0)
        compiled, state = compile_with_passes(CheckpointedBlock(), {"rotate": "fused"},
                                              aot=False)
        compiled(torch.randn(2, 8, 64))
        report = {r.fqn: r for r in state["ctx"].layer_reports}
        for fqn in ("block.fc1", "block.fc2"):
            self.assertFalse(report[fqn].quantized)
            self.assertIn("rotate='fused'", report[fqn].reason)
