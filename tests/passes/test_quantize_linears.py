"""QuantizeLinears: snapshots of the Dynamo graph after the halo passes and of the AOTAutograd
forward/backward graphs, and the linear forms it must recognise (F.linear, addmm with a [in, out]
weight, x @ W.t(), x @ W.T, ...).

Snapshots: `EXPECTTEST_ACCEPT=1 pytest tests/passes/test_quantize_linears.py` rewrites them.
"""

import operator
import re

import expecttest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

from halo_compile import HaloConfig
from halo_compile.kernels.settings import LinearSettings, MatmulSettings, WeightSource
from halo_compile.passes import PassManager
from halo_compile.passes.graph_utils import source_name

QL = torch.ops.halo.quantized_linear.default
SM = torch.ops.halo.scaled_matmul.default


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def compile_with_passes(model, options, aot=True):
    """torch.compile `model` with a backend that runs the halo passes on the Dynamo graph (inside
    the backend: Dynamo drops the placeholders' source metadata once the backend returns), then,
    if `aot`, AOTAutograd with compilers that keep the forward and backward graphs. Returns the
    compiled model and a dict filled on its first call: gm, ctx, and fw / bw graphs."""
    config = HaloConfig.from_options({"compiler": "aot_eager", "min_features": 16, **options})
    state = {}

    def keep(kind):
        def compile_fn(graph, _inputs):
            state[kind] = graph
            return make_boxed_func(graph)
        return compile_fn

    def backend(gm, example_inputs):
        assert "gm" not in state, "one graph expected"
        state["ctx"] = PassManager().run(gm, example_inputs, config)
        state["gm"] = gm
        state["graph_text"] = format_dynamo_graph(gm)
        state["sources"] = {n: source_name(n) for n in gm.graph.nodes if n.op == "placeholder"}
        if not aot:
            return gm.forward
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("fw"),
                                     bw_compiler=keep("bw"))

    return torch.compile(model, backend=backend, fullgraph=True), state


def _target_name(node):
    if node.op == "call_method":
        return "." + node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def format_dynamo_graph(gm: fx.GraphModule) -> str:
    """One line per node, placeholders named by what they are in the model ("fc1.weight", "x")."""
    names = {}
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = source_name(node) or re.sub(r"^L_(.*)_$", r"\1", node.target)
            lines.append(f"input {names[node]}")
            continue
        names[node] = node.name

        def fmt(arg):
            if isinstance(arg, fx.Node):
                return names[arg]
            if isinstance(arg, (tuple, list)):
                return "(" + ", ".join(fmt(a) for a in arg) + ("," if len(arg) == 1 else "") + ")"
            return repr(arg)

        args = ", ".join([fmt(a) for a in node.args]
                         + [f"{k}={fmt(v)}" for k, v in node.kwargs.items()])
        if node.op == "output":
            lines.append(f"return {args}")
        elif not node.users:
            lines.append(f"(unused) {_target_name(node)}({args})")
        else:
            lines.append(f"{node.name} = {_target_name(node)}({args})")
    return "\n".join(lines)


def normalize_code(code: str) -> str:
    """gm.code without blank lines and without the `;  a = b = None` frees."""
    lines = []
    for line in code.splitlines():
        line = re.sub(r";\s+[\w\s=]+= None$", "", line).rstrip()
        if line.strip():
            lines.append(line[4:] if line.startswith("    ") else line)
    return "\n".join(lines)


def call_nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class TestQuantizeLinearsSnapshots(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.model = MLP()
        self.x = torch.randn(2, 8, 64, requires_grad=True)

    def test_dynamo_graph_halo2(self):
        compiled, state = compile_with_passes(
            self.model, {"format": "fp8_e4m3", "hadamard": "halo2"}, aot=False)
        compiled(self.x)
        gm, ctx = state["gm"], state["ctx"]
        self.assertEqual([site.fqn for site in ctx.analysis.linears], ["fc1", "fc2"])
        self.assertEqual(len(call_nodes(gm, QL)), 2)
        self.assertExpectedInline(state["graph_text"], """\
input fc1.weight
input fc1.bias
input x
input fc2.weight
input fc2.bias
quantized_linear_default = halo.quantized_linear.default(x, fc1.weight, fc1.bias, '{"format":"fp8_e4m3","granularity":"row","forward_rotation":"inner","grad_input_rotation":"outer","grad_weight_rotation":"none","max_block":256,"grad_rounding":"nearest","check_finite":true,"name":"fc1","fast_accum":true,"cache_weight":false}')
gelu = gelu(quantized_linear_default)
quantized_linear_default_1 = halo.quantized_linear.default(gelu, fc2.weight, fc2.bias, '{"format":"fp8_e4m3","granularity":"row","forward_rotation":"inner","grad_input_rotation":"outer","grad_weight_rotation":"none","max_block":256,"grad_rounding":"nearest","check_finite":true,"name":"fc2","fast_accum":true,"cache_weight":false}')
return (quantized_linear_default_1,)""")

    def test_dynamo_graph_per_layer_settings(self):
        compiled, state = compile_with_passes(self.model, {
            "format": "int8", "hadamard": "all_inner", "hadamard_block": 64, "scale": "tensor",
            "grad_rounding": "stochastic", "nonfinite": "propagate",
            "layers": {"fc1": None},
        }, aot=False)
        compiled(self.x)
        gm = state["gm"]
        # fc1 stays the original high-precision linear; fc2 carries every setting.
        self.assertEqual(len(call_nodes(gm, QL)), 1)
        self.assertExpectedInline(state["graph_text"], """\
input fc1.weight
input fc1.bias
input x
input fc2.weight
input fc2.bias
linear = linear(x, fc1.weight, fc1.bias)
gelu = gelu(linear)
quantized_linear_default = halo.quantized_linear.default(gelu, fc2.weight, fc2.bias, '{"format":"int8","granularity":"tensor","forward_rotation":"inner","grad_input_rotation":"inner","grad_weight_rotation":"inner","max_block":64,"grad_rounding":"stochastic","check_finite":false,"name":"fc2","fast_accum":true,"cache_weight":false}')
return (quantized_linear_default,)""")

    def test_aot_forward_and_backward_graphs(self):
        compiled, state = compile_with_passes(self.model,
                                              {"format": "fp8_e4m3", "hadamard": "halo2"})
        out = compiled(self.x)
        out.square().sum().backward()
        fw, bw = state["fw"], state["bw"]

        # Explicitly, beyond the snapshots: the forward runs both linears as halo ops, and the
        # backward computes grad-input and grad-weight of both with halo.scaled_matmul, with the
        # halo2 rotations; no high-precision matmul is left anywhere.
        linears = [LinearSettings.decode(n.args[3]) for n in call_nodes(fw, QL)]
        self.assertEqual([s.name for s in linears], ["fc1", "fc2"])
        # The forward GEMM accumulates fast (the default); the gradient GEMMs do not.
        self.assertEqual([s.fast_accum for s in linears], [True, True])
        matmuls = [MatmulSettings.decode(n.args[2]) for n in call_nodes(bw, SM)]
        self.assertEqual([s.fast_accum for s in matmuls], [False] * 4)
        scaled = {s.where: s.rotation for s in matmuls}
        self.assertEqual(scaled, {
            "fc2 grad-input": "outer", "fc2 grad-weight": "none",
            "fc1 grad-input": "outer", "fc1 grad-weight": "none",
        })
        self.assertEqual({s.format for s in matmuls}, {"fp8_e4m3"})
        for graph in (fw, bw):
            for node in graph.graph.nodes:
                if node.op == "call_function":
                    self.assertNotIn(node.target, (torch.ops.aten.mm.default,
                                                   torch.ops.aten.addmm.default,
                                                   torch.ops.aten.bmm.default,
                                                   torch.ops.aten.linear.default))

        self.assertExpectedInline(normalize_code(fw.code), """\
def forward(self, primals_1, primals_2, primals_3, primals_4, primals_5):
quantized_linear = torch.ops.halo.quantized_linear.default(primals_3, primals_1, primals_2, '{"format":"fp8_e4m3","granularity":"row","forward_rotation":"inner","grad_input_rotation":"outer","grad_weight_rotation":"none","max_block":256,"grad_rounding":"nearest","check_finite":true,"name":"fc1","fast_accum":true,"cache_weight":false}')
gelu = torch.ops.aten.gelu.default(quantized_linear)
quantized_linear_1 = torch.ops.halo.quantized_linear.default(gelu, primals_4, primals_5, '{"format":"fp8_e4m3","granularity":"row","forward_rotation":"inner","grad_input_rotation":"outer","grad_weight_rotation":"none","max_block":256,"grad_rounding":"nearest","check_finite":true,"name":"fc2","fast_accum":true,"cache_weight":false}')
return (quantized_linear_1, primals_1, primals_3, primals_4, quantized_linear, gelu)""")
        self.assertExpectedInline(normalize_code(bw.code), """\
def forward(self, primals_1, primals_3, primals_4, quantized_linear, gelu, tangents_1):
view = torch.ops.aten.view.default(tangents_1, [-1, 64])
t = torch.ops.aten.t.default(view)
t_1 = torch.ops.aten.t.default(primals_4)
scaled_matmul = torch.ops.halo.scaled_matmul.default(view, t_1, '{"format":"fp8_e4m3","rotation":"outer","max_block":256,"granularity":"row","rounding_a":"nearest","rounding_b":"nearest","check_finite":true,"where":"fc2 grad-input","fast_accum":false}')
view_1 = torch.ops.aten.view.default(scaled_matmul, [2, 8, 128])
view_2 = torch.ops.aten.view.default(gelu, [-1, 128])
t_2 = torch.ops.aten.t.default(view_2)
scaled_matmul_1 = torch.ops.halo.scaled_matmul.default(t, t_2, '{"format":"fp8_e4m3","rotation":"none","max_block":256,"granularity":"row","rounding_a":"nearest","rounding_b":"nearest","check_finite":false,"where":"fc2 grad-weight","fast_accum":false}')
sum_1 = torch.ops.aten.sum.dim_IntList(view, [0])
gelu_backward = torch.ops.aten.gelu_backward.default(view_1, quantized_linear)
view_3 = torch.ops.aten.view.default(gelu_backward, [-1, 128])
t_3 = torch.ops.aten.t.default(view_3)
t_4 = torch.ops.aten.t.default(primals_1)
scaled_matmul_2 = torch.ops.halo.scaled_matmul.default(view_3, t_4, '{"format":"fp8_e4m3","rotation":"outer","max_block":256,"granularity":"row","rounding_a":"nearest","rounding_b":"nearest","check_finite":true,"where":"fc1 grad-input","fast_accum":false}')
view_4 = torch.ops.aten.view.default(scaled_matmul_2, [2, 8, 64])
view_5 = torch.ops.aten.view.default(primals_3, [-1, 64])
t_5 = torch.ops.aten.t.default(view_5)
scaled_matmul_3 = torch.ops.halo.scaled_matmul.default(t_3, t_5, '{"format":"fp8_e4m3","rotation":"none","max_block":256,"granularity":"row","rounding_a":"nearest","rounding_b":"nearest","check_finite":false,"where":"fc1 grad-weight","fast_accum":false}')
sum_2 = torch.ops.aten.sum.dim_IntList(view_3, [0])
return (scaled_matmul_3, sum_2, view_4, scaled_matmul_1, sum_1)""")

        # The graphs compute what the halo ops compute when called eagerly, gradients included.
        x_ref = self.x.detach().clone().requires_grad_()
        ref_params = [p.detach().clone().requires_grad_() for p in self.model.parameters()]
        w1, b1, w2, b2 = ref_params
        ref = QL(F.gelu(QL(x_ref, w1, b1, _halo2_settings("fc1"))), w2, b2,
                 _halo2_settings("fc2"))
        ref.square().sum().backward()
        self.assertLess(rel_err(out, ref), 1e-6)
        self.assertLess(rel_err(self.x.grad, x_ref.grad), 1e-6)
        for p, p_ref in zip(self.model.parameters(), ref_params, strict=False):
            self.assertLess(rel_err(p.grad, p_ref.grad), 1e-6)

    def test_aot_graphs_with_cached_weights(self):
        """Option cache_weights: the forward's op takes cache_weight=True, and grad-input reads
        the weight through the cached-weight op (the parameter itself, not a transposed copy);
        grad-weight is as without it. Same values as without the cache."""
        FW = torch.ops.halo.frozen_weight_matmul.default
        compiled, state = compile_with_passes(self.model, {"format": "fp8_e4m3",
                                                           "hadamard": "halo2",
                                                           "cache_weights": True})
        out = compiled(self.x)
        out.square().sum().backward()
        fw, bw = state["fw"], state["bw"]
        self.assertEqual([LinearSettings.decode(n.args[3]).cache_weight
                          for n in call_nodes(fw, QL)], [True, True])
        self.assertEqual([(n.args[1].name, WeightSource.decode(n.args[3]).transpose,
                           MatmulSettings.decode(n.args[4]).where) for n in call_nodes(bw, FW)],
                         [("primals_4", True, "fc2 grad-input"),
                          ("primals_1", True, "fc1 grad-input")])
        self.assertEqual([MatmulSettings.decode(n.args[2]).where for n in call_nodes(bw, SM)],
                         ["fc2 grad-weight", "fc1 grad-weight"])
        self.assertEqual([r.weight_cache for r in state["ctx"].layer_reports],
                         ["cached", "cached"])

        torch._dynamo.reset()
        model = MLP()
        model.load_state_dict(self.model.state_dict())
        x = self.x.detach().clone().requires_grad_()
        plain, _ = compile_with_passes(model, {"format": "fp8_e4m3", "hadamard": "halo2"})
        ref = plain(x)
        ref.square().sum().backward()
        self.assertTrue(torch.equal(out, ref) and torch.equal(self.x.grad, x.grad))
        for p, p_ref in zip(self.model.parameters(), model.parameters(), strict=False):
            self.assertTrue(torch.equal(p.grad, p_ref.grad))


# --------------------------------------------------------------------------------------------
# The forms of a linear: F.linear, addmm with a [in, out] weight (GPT-2 Conv1D), x @ W.t(),
# x @ W.T, matmul(x, W.transpose(0, 1)), x @ W_kn, mm(x, W_kn); chained linears
# --------------------------------------------------------------------------------------------


class Conv1DLike(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], y = addmm(bias, x2d, W)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) / 10)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Forms(nn.Module):
    def __init__(self):
        super().__init__()

        def param(*shape):
            return nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5)

        self.a = param(64, 64)  # [out, in]: x @ a.t()
        self.b = param(32, 64)  # [out, in]: y @ b.T
        self.d = param(64, 64)  # [out, in]: matmul(y, d.transpose(0, 1))
        self.c = param(64, 32)  # [in, out]: x @ c
        self.e = param(64, 32)  # [in, out]: mm(x2d, e)
        self.conv = Conv1DLike(64, 48)

    def forward(self, x):
        y1 = x @ self.a.t()
        y2 = y1 @ self.b.T  # reads y1 directly: a chain of two linears
        y3 = torch.matmul(y1, self.d.transpose(0, 1))
        y4 = x @ self.c
        y5 = torch.mm(y3.reshape(-1, 64), self.e).view_as(y4)
        return torch.cat([y2 + y4 + y5, self.conv(F.gelu(y3))], dim=-1)


# (fqn, kind, stored [in, out]?, in, out)
EXPECTED_SITES = [
    ("a", "matmul", False, 64, 64),
    ("b", "matmul", False, 64, 32),
    ("d", "matmul", False, 64, 64),
    ("c", "matmul", True, 64, 32),
    ("e", "matmul", True, 64, 32),
    ("conv", "addmm", True, 64, 48),
]


def _as_out_in(model, fqn):
    """The [out, in] weight of a site, as halo.quantized_linear takes it."""
    weight = model.get_parameter(f"{fqn}.weight" if fqn == "conv" else fqn)
    return weight.t() if fqn in ("c", "e", "conv") else weight


def _halo2_settings(name: str) -> str:
    """What the pass gives the linear `name` under the default options (halo2, block 256)."""
    return LinearSettings("fp8_e4m3", "row", "inner", "outer", "none", 256, name=name,
                          fast_accum=True).encoded


def _forms_reference(model, x, settings):
    """Forms.forward written with eager halo ops: what the rewritten graph must compute."""
    def ql(inp, fqn, bias=None):
        return QL(inp, _as_out_in(model, fqn), bias, settings(fqn))

    y1 = ql(x, "a")
    y2 = ql(y1, "b")
    y3 = ql(y1, "d")
    y4 = ql(x, "c")
    y5 = ql(y3.reshape(-1, 64), "e").view_as(y4)
    conv = ql(F.gelu(y3).reshape(-1, 64), "conv", model.conv.bias).view(*x.shape[:-1], 48)
    return torch.cat([y2 + y4 + y5, conv], dim=-1)


class TestLinearForms(expecttest.TestCase):
    def test_sites_found_and_rewritten(self):
        torch.manual_seed(1)
        model = Forms()
        x = torch.randn(2, 8, 64)
        compiled, state = compile_with_passes(model, {"format": "fp8_e4m3"}, aot=False)
        compiled(x)
        gm, ctx = state["gm"], state["ctx"]
        found = [(s.fqn, s.kind, s.weight_transposed, s.in_features, s.out_features)
                 for s in ctx.analysis.linears]
        self.assertEqual(found, EXPECTED_SITES)
        self.assertTrue(all(layer.quantized for layer in ctx.layer_reports))
        # Every matmul against a parameter is now a halo op: no matmul/mm/addmm is left.
        for node in gm.graph.nodes:
            if node.op == "call_function":
                self.assertNotIn(node.target, (torch.matmul, torch.mm, torch.addmm,
                                               operator.matmul))
        ops = call_nodes(gm, QL)
        self.assertEqual([LinearSettings.decode(n.args[3]).name for n in ops],
                         ["a", "b", "d", "c", "e", "conv"])
        # The chained linear reads the halo op that replaced its producer.
        self.assertIs(ops[1].args[0], ops[0])
        self.assertIs(ops[2].args[0], ops[0])
        # addmm's bias is passed on.
        self.assertEqual(state["sources"][ops[5].args[2]], "conv.bias")

    def _compiled_vs(self, options, seed):
        torch.manual_seed(seed)
        model = Forms()
        x = torch.randn(2, 8, 64, requires_grad=True)
        compiled, _ = compile_with_passes(model, options)
        out = compiled(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads["x"] = x.grad.clone()
        for p in model.parameters():
            p.grad = None
        x.grad = None
        return model, x, out, grads

    def test_forms_quantized_match_eager_halo_ops(self):
        for seed in (2, 3):
            model, x, out, grads = self._compiled_vs({"format": "fp8_e4m3"}, seed)
            ref = _forms_reference(model, x, _halo2_settings)
            ref.square().sum().backward()
            self.assertLess(rel_err(out, ref), 1e-6)
            ref_grads = {n: p.grad for n, p in model.named_parameters()}
            ref_grads["x"] = x.grad
            for name, grad in grads.items():
                self.assertLess(rel_err(grad, ref_grads[name]), 1e-6, name)

    def test_forms_with_cached_weights(self):
        """Option cache_weights: the [out, in] parameters are cached; a weight stored [in, out]
        reaches the op as a transpose the graph computes, so it is not, and the report says why.
        Same values either way."""
        torch.manual_seed(6)
        model = Forms()
        compiled, state = compile_with_passes(model, {"format": "fp8_e4m3", "cache_weights": True},
                                              aot=False)
        compiled(torch.randn(2, 8, 64))
        reports = {r.fqn: r.weight_cache for r in state["ctx"].layer_reports}
        transposed = ("not cached: stored [in, out] (as GPT-2's Conv1D); the graph reads its "
                      "transpose")
        self.assertEqual(reports, {"a": "cached", "b": "cached", "d": "cached", "c": transposed,
                                   "e": transposed, "conv": transposed})
        torch._dynamo.reset()
        _, _, out, grads = self._compiled_vs({"format": "fp8_e4m3", "cache_weights": True}, 6)
        torch._dynamo.reset()
        _, _, plain_out, plain_grads = self._compiled_vs({"format": "fp8_e4m3"}, 6)
        self.assertTrue(torch.equal(out, plain_out))
        for name, grad in grads.items():
            self.assertTrue(torch.equal(grad, plain_grads[name]), name)

    def test_forms_unquantized_match_float32(self):
        for seed in (4, 5):
            model, x, out, grads = self._compiled_vs({"format": "none", "hadamard": "all_inner"},
                                                     seed)
            ref = model(x)
            ref.square().sum().backward()
            self.assertLess(rel_err(out, ref), 1e-5)
            self.assertLess(rel_err(grads["x"], x.grad), 1e-5)
            for name, p in model.named_parameters():
                self.assertLess(rel_err(grads[name], p.grad), 1e-5, name)

    def test_chained_nn_linears_through_the_backend(self):
        """nn.Linear -> nn.Linear -> nn.Linear, each reading the previous one's output."""
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128), nn.Linear(128, 64))
        ref = nn.Sequential(*(nn.Linear(m.in_features, m.out_features) for m in model))
        ref.load_state_dict(model.state_dict())
        compiled = torch.compile(model, backend="halo", options={
            "format": "none", "hadamard": "all_inner", "compiler": "aot_eager",
            "min_features": 16})
        x = torch.randn(4, 8, 64)
        out = compiled(x)
        out.square().sum().backward()
        ref_out = ref(x)
        ref_out.square().sum().backward()
        self.assertLess(rel_err(out, ref_out), 1e-5)
        for p, p_ref in zip(model.parameters(), ref.parameters(), strict=False):
            self.assertLess(rel_err(p.grad, p_ref.grad), 1e-5)


if __name__ == "__main__":
    import unittest

    unittest.main()
