"""FuseNorms, RotateResidualStream and FoldOnlineRotations on one decoder layer's Dynamo graph:
a snapshot of where each rotation went, and checks of each pass on its own."""

from __future__ import annotations

import expecttest
import torch
import transformers

from halo_compile.config import HaloConfig
from halo_compile.passes.context import PassContext
from halo_compile.passes.find_attention import FindAttention
from halo_compile.passes.find_linears import FindLinears
from halo_compile.passes.find_norms import FindNormsAndResiduals
from halo_compile.passes.fold_online_rotations import FoldOnlineRotations
from halo_compile.passes.fuse_norms import FuseNorms
from halo_compile.passes.graph_utils import GraphTensors, call_target_name
from halo_compile.passes.rotate_residual import RotateResidualStream

ROTATION_PASSES = (FindLinears(), FindAttention(), FindNormsAndResiduals(), FuseNorms(),
                   RotateResidualStream(), FoldOnlineRotations())


def one_layer_llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def run_passes(model, passes, options, ids):
    """Capture the model's graph, run `passes` on it, and return (context, output of the
    transformed graph, output of the model)."""
    contexts = []

    def backend(gm, example_inputs):
        config = HaloConfig.from_options(options)
        ctx = PassContext(gm, example_inputs, config, GraphTensors(gm, example_inputs))
        for graph_pass in passes:
            graph_pass.run(ctx)
        gm.graph.lint()
        gm.recompile()
        contexts.append(ctx)
        return gm.forward

    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids).logits
        expected = model(input_ids=ids).logits
    return contexts[0], got, expected


def rotation_lines(ctx) -> str:
    """The fold and rotation nodes, each with the linear or op that reads it, in graph order,
    then the linears whose forward matmul rotates its input online."""
    lines = []
    for node in ctx.gm.graph.nodes:
        if node.op != "call_function" or node.target.__module__ != "halo_compile.passes.folding":
            continue
        args = ", ".join(_short(a) for a in node.args)
        readers = ", ".join(sorted(user.name for user in node.users))
        lines.append(f"{node.target.__name__}({args}) -> {readers}")
    # Online rotations are no graph nodes: the forward matmul's "inner" rotation does them.
    lines += [f"online Hadamard (forward inner) -> {fqn}"
              for fqn in sorted(ctx.fusion.forward_hadamard)]
    return "\n".join(lines)


def _short(arg) -> str:
    """A parameter's FQN, another node's name, a constant's repr."""
    if not isinstance(arg, torch.fx.Node):
        return repr(arg)
    if arg.op != "placeholder":
        return arg.name
    return (arg.name.removeprefix("l_args_0_modules_").replace("_modules_", ".")
            .replace("_parameters_weight_", ".weight"))


class TestSnapshot(expecttest.TestCase):
    def test_one_decoder_layer(self):
        ids = torch.randint(0, 128, (2, 8))
        ctx, got, expected = run_passes(one_layer_llama(0), ROTATION_PASSES,
                                        {"rotate": "fused", "format": "none"}, ids)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5
        self.assertExpectedInline(rotation_lines(ctx), """\
rotate(inputs_embeds, 0, 64) -> hidden_states, hidden_states_5
scale_input_side(model.layers.0.self_attn.q_proj.weight, model.layers.0.input_layernorm.weight) -> rotate_1
rotate(scale_input_side, 0, 64) -> linear
scale_input_side(model.layers.0.self_attn.k_proj.weight, model.layers.0.input_layernorm.weight) -> rotate_2
rotate(scale_input_side_1, 0, 64) -> linear_1
scale_input_side(model.layers.0.self_attn.v_proj.weight, model.layers.0.input_layernorm.weight) -> rotate_3
rotate(scale_input_side_2, 0, 64) -> rotate_output_side_2
rotate_output_side(rotate_3, None, 16) -> linear_2
rotate_output_side(model.layers.0.self_attn.o_proj.weight, 0, 64) -> rotate_7
rotate(rotate_output_side, None, 16) -> attn_output_4
scale_input_side(model.layers.0.mlp.gate_proj.weight, model.layers.0.post_attention_layernorm.weight) -> rotate_4
rotate(scale_input_side_3, 0, 64) -> linear_4
scale_input_side(model.layers.0.mlp.up_proj.weight, model.layers.0.post_attention_layernorm.weight) -> rotate_5
rotate(scale_input_side_4, 0, 64) -> linear_5
rotate_output_side(model.layers.0.mlp.down_proj.weight, 0, 64) -> down_proj
scale_input_side(lm_head.weight, model.norm.weight) -> rotate_6
rotate(scale_input_side_5, 0, 64) -> logits
online Hadamard (forward inner) -> model.layers.0.mlp.down_proj""")


def test_passes_do_nothing_unless_fused():
    for rotate in ("online",):
        ctx, got, expected = run_passes(one_layer_llama(1), ROTATION_PASSES, {"rotate": rotate},
                                        torch.randint(0, 128, (2, 8)))
        assert not ctx.fusion.folds and not ctx.fusion.prerotated
        assert not any(n.op == "call_function" and "folding" in n.target.__module__
                       for n in ctx.gm.graph.nodes)
        assert torch.equal(got, expected)


def test_fuse_norms_alone_is_invariant_and_scale_free():
    """Norm fusion without the rotation: same logits, the norms no longer multiply by a
    parameter, and every reader of a norm carries its scale."""
    for seed in (2, 3):
        model = one_layer_llama(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.copy_(torch.rand_like(param) * 2 + 0.1)
        passes = (FindLinears(), FindAttention(), FindNormsAndResiduals(), FuseNorms())
        ctx, got, expected = run_passes(model, passes, {"rotate": "fused"},
                                        torch.randint(0, 128, (2, 8)))
        assert ((got - expected).norm() / expected.norm()).item() < 1e-6
        assert len(ctx.fusion.scale_free_norms) == 3
        for norm in ctx.fusion.scale_free_norms:
            assert not any(call_target_name(n) == "mul" and any(
                ctx.tensors.parameter(a) is not None for a in n.all_input_nodes)
                for n in norm.nodes)
        assert set(ctx.fusion.folds) == {site.fqn for site in ctx.analysis.linears
                                         if not site.fqn.endswith(("o_proj", "down_proj"))}
