"""FindNormsAndResiduals on Dynamo graphs of tiny HF models and hand-written modules."""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from analysis_models import (
    HIDDEN,
    LAYERS,
    VOCAB,
    RMSNorm,
    TinyTransformer,
    analyze,
    hf_model,
    token_ids,
)

from halo_compile.passes.analysis import GraphAnalysis
from halo_compile.passes.find_norms import FindNormsAndResiduals


def analyze_norms(model: nn.Module, dynamic: bool = False, **inputs) -> GraphAnalysis:
    return analyze(model, FindNormsAndResiduals(), dynamic=dynamic, **inputs)


def rms_norm_inline(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """An RMSNorm written out inside a bigger module, upcasting like HF does."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).type_as(x) * weight


class NormZoo(nn.Module):
    """Every norm form in one block, each feeding its own linears, and two residual adds."""

    def __init__(self):
        super().__init__()
        self.module_norm = RMSNorm(HIDDEN)  # hand-written module: found by its class name
        self.torch_norm = nn.RMSNorm(HIDDEN)
        self.layer_norm = nn.LayerNorm(HIDDEN)
        self.inline_weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.final_weight = nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.a, self.b, self.c = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.up, self.down = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(2 * HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.a(self.module_norm(x)) * self.b(self.torch_norm(x)).sigmoid()
        x = x + F.dropout(self.c(self.layer_norm(x)) * mixed, 0.1)  # not a linear's output
        x = x + 0.5 * F.dropout(self.c(self.layer_norm(x)), 0.1)
        hidden = F.gelu(self.up(rms_norm_inline(x, self.inline_weight)), approximate="tanh")
        x = x + self.down(hidden).view(-1, HIDDEN).view_as(x)
        return self.head(F.rms_norm(x, (HIDDEN,), self.final_weight))


def describe(analysis: GraphAnalysis) -> str:
    return "\n".join(analysis.describe())


class TestSnapshots(expecttest.TestCase):
    def test_llama(self):
        analysis = analyze_norms(hf_model("llama", "sdpa", 0), input_ids=token_ids(0))
        self.assertExpectedInline(describe(analysis), """\
rmsnorm model.layers.0.input_layernorm -> model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj
rmsnorm model.layers.0.post_attention_layernorm -> model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj
rmsnorm model.layers.1.input_layernorm -> model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj
rmsnorm model.layers.1.post_attention_layernorm -> model.layers.1.mlp.gate_proj, model.layers.1.mlp.up_proj
rmsnorm model.norm -> lm_head
residual add in model.layers.0 <- model.layers.0.self_attn.o_proj
residual add in model.layers.0 <- model.layers.0.mlp.down_proj
residual add in model.layers.1 <- model.layers.1.self_attn.o_proj
residual add in model.layers.1 <- model.layers.1.mlp.down_proj""")

    def test_gpt2(self):
        analysis = analyze_norms(hf_model("gpt2", "sdpa", 1), input_ids=token_ids(1))
        self.assertExpectedInline(describe(analysis), """\
layernorm transformer.h.0.ln_1 -> transformer.h.0.attn.c_attn
layernorm transformer.h.0.ln_2 -> transformer.h.0.mlp.c_fc
layernorm transformer.h.1.ln_1 -> transformer.h.1.attn.c_attn
layernorm transformer.h.1.ln_2 -> transformer.h.1.mlp.c_fc
layernorm transformer.ln_f -> lm_head
residual add in transformer.h.0 <- transformer.h.0.attn.c_proj
residual add in transformer.h.0 <- transformer.h.0.mlp.c_proj
residual add in transformer.h.1 <- transformer.h.1.attn.c_proj
residual add in transformer.h.1 <- transformer.h.1.mlp.c_proj""")

    def test_hand_written_transformer(self):
        torch.manual_seed(2)
        analysis = analyze_norms(TinyTransformer(), x=torch.randn(2, 8, HIDDEN))
        self.assertExpectedInline(describe(analysis), """\
rmsnorm blocks.0.attn_norm -> blocks.0.wq, blocks.0.wk, blocks.0.wv
rmsnorm blocks.0.mlp_norm -> blocks.0.up
rmsnorm blocks.1.attn_norm -> blocks.1.wq, blocks.1.wk, blocks.1.wv
rmsnorm blocks.1.mlp_norm -> blocks.1.up
residual add in blocks.0 <- blocks.0.wo
residual add in blocks.0 <- blocks.0.down
residual add in blocks.1 <- blocks.1.wo
residual add in blocks.1 <- blocks.1.down""")

    def test_every_norm_form(self):
        torch.manual_seed(3)
        analysis = analyze_norms(NormZoo(), x=torch.randn(2, 8, HIDDEN))
        self.assertExpectedInline(describe(analysis), """\
rmsnorm module_norm -> a
rmsnorm torch_norm -> b
layernorm layer_norm -> c
layernorm layer_norm -> c
rmsnorm inline_weight -> up
rmsnorm final_weight -> head
residual add in (root) <- c
residual add in (root) <- down""")


Norms = list[tuple[str, str, list[str]]]  # (kind, fqn, feeds)
Residuals = list[tuple[str, list[str]]]  # (fqn, writers)


def expected_layer(arch: str, layer: int) -> tuple[Norms, Residuals]:
    """The norms and residual adds of one layer of a tiny HF model."""
    if arch == "gpt2":
        p = f"transformer.h.{layer}"
        return ([("layernorm", f"{p}.ln_1", [f"{p}.attn.c_attn"]),
                 ("layernorm", f"{p}.ln_2", [f"{p}.mlp.c_fc"])],
                [(p, [f"{p}.attn.c_proj"]), (p, [f"{p}.mlp.c_proj"])])
    if arch == "bert":  # post-norm: a layer's last norm feeds the next layer's attention
        p, nxt = f"encoder.layer.{layer}", f"encoder.layer.{layer + 1}.attention.self"
        feeds = ([f"{nxt}.query", f"{nxt}.key", f"{nxt}.value"] if layer + 1 < LAYERS
                 else ["pooler.dense"])
        return ([("layernorm", f"{p}.attention.output.LayerNorm", [f"{p}.intermediate.dense"]),
                 ("layernorm", f"{p}.output.LayerNorm", feeds)],
                [(f"{p}.attention.output", [f"{p}.attention.output.dense"]),
                 (f"{p}.output", [f"{p}.output.dense"])])
    p = f"model.layers.{layer}"
    attn, mlp = f"{p}.self_attn", f"{p}.mlp"
    return ([("rmsnorm", f"{p}.input_layernorm", [f"{attn}.q_proj", f"{attn}.k_proj",
                                                   f"{attn}.v_proj"]),
             ("rmsnorm", f"{p}.post_attention_layernorm", [f"{mlp}.gate_proj", f"{mlp}.up_proj"])],
            [(p, [f"{attn}.o_proj"]), (p, [f"{mlp}.down_proj"])])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_every_layer_has_its_norms_and_residuals(arch: str, attn: str):
    seed = 10 + len(arch) * len(attn)
    analysis = analyze_norms(hf_model(arch, attn, seed), input_ids=token_ids(seed))
    norms = [(n.kind, n.fqn, n.feeds) for n in analysis.norms]
    residuals = [(r.fqn, r.writers) for r in analysis.residual_adds]
    first, last = {
        "gpt2": ([], [("layernorm", "transformer.ln_f", ["lm_head"])]),
        "bert": ([("layernorm", "embeddings.LayerNorm",
                   [f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")])],
                 []),
    }.get(arch, ([], [("rmsnorm", "model.norm", ["lm_head"])]))
    expected_norms, expected_residuals = list(first), []
    for layer in range(LAYERS):
        layer_norms, layer_residuals = expected_layer(arch, layer)
        expected_norms += layer_norms
        expected_residuals += layer_residuals
    assert norms == expected_norms + last
    assert residuals == expected_residuals
    assert all(n.weight is not None and n.weight.shape == (HIDDEN,) for n in analysis.norms)


def test_dynamic_shapes():
    analysis = analyze_norms(hf_model("llama", "sdpa", 4), dynamic=True, input_ids=token_ids(4))
    assert [r.writers for r in analysis.residual_adds] == [
        [f"model.layers.{layer}.{name}"] for layer in range(LAYERS)
        for name in ("self_attn.o_proj", "mlp.down_proj")
    ]


def test_lora_sum_writes_the_residual():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(hf_model("llama", "sdpa", 5),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    analysis = analyze_norms(model, input_ids=token_ids(5))
    p = "base_model.model.model.layers"
    assert [r.writers for r in analysis.residual_adds] == [
        writers for layer in range(LAYERS) for writers in (
            [f"{p}.{layer}.self_attn.o_proj.base_layer",
             f"{p}.{layer}.self_attn.o_proj.lora_B.default"],
            [f"{p}.{layer}.mlp.down_proj"],
        )
    ]
    assert analysis.norms[0].feeds == [f"{p}.0.self_attn.{name}" for name in (
        "q_proj.base_layer", "q_proj.lora_A.default", "k_proj", "v_proj")]
