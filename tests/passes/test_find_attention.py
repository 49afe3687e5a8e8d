"""FindAttention on Dynamo graphs of tiny HF models and a hand-written transformer."""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.nn as nn
from analysis_models import HIDDEN, LAYERS, TinyTransformer, analyze, hf_model, token_ids

from halo_compile.passes.analysis import GraphAnalysis
from halo_compile.passes.find_attention import FindAttention


class Router(nn.Module):
    """A MoE-style softmax over a linear's logits, then a matmul: not attention."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.gate(x), dim=-1) @ experts


def describe(analysis: GraphAnalysis) -> str:
    return "\n".join(analysis.describe())


class TestSnapshots(expecttest.TestCase):
    def test_llama_sdpa(self):
        analysis = analyze(hf_model("llama", "sdpa", 0), FindAttention(), input_ids=token_ids(0))
        self.assertExpectedInline(describe(analysis), """\
attention model.layers.0.self_attn (sdpa): q=model.layers.0.self_attn.q_proj k=model.layers.0.self_attn.k_proj v=model.layers.0.self_attn.v_proj o=model.layers.0.self_attn.o_proj
attention model.layers.1.self_attn (sdpa): q=model.layers.1.self_attn.q_proj k=model.layers.1.self_attn.k_proj v=model.layers.1.self_attn.v_proj o=model.layers.1.self_attn.o_proj""")

    def test_llama_eager(self):
        analysis = analyze(hf_model("llama", "eager", 1), FindAttention(), input_ids=token_ids(1))
        self.assertExpectedInline(describe(analysis), """\
attention model.layers.0.self_attn (eager): q=model.layers.0.self_attn.q_proj k=model.layers.0.self_attn.k_proj v=model.layers.0.self_attn.v_proj o=model.layers.0.self_attn.o_proj
attention model.layers.1.self_attn (eager): q=model.layers.1.self_attn.q_proj k=model.layers.1.self_attn.k_proj v=model.layers.1.self_attn.v_proj o=model.layers.1.self_attn.o_proj""")

    def test_gpt2_eager(self):
        analysis = analyze(hf_model("gpt2", "eager", 2), FindAttention(), input_ids=token_ids(2))
        self.assertExpectedInline(describe(analysis), """\
attention transformer.h.0.attn (eager): q=transformer.h.0.attn.c_attn k=transformer.h.0.attn.c_attn v=transformer.h.0.attn.c_attn o=transformer.h.0.attn.c_proj
attention transformer.h.1.attn (eager): q=transformer.h.1.attn.c_attn k=transformer.h.1.attn.c_attn v=transformer.h.1.attn.c_attn o=transformer.h.1.attn.c_proj""")

    def test_bert_sdpa(self):
        analysis = analyze(hf_model("bert", "sdpa", 3), FindAttention(), input_ids=token_ids(3))
        self.assertExpectedInline(describe(analysis), """\
attention encoder.layer.0.attention.self (sdpa): q=encoder.layer.0.attention.self.query k=encoder.layer.0.attention.self.key v=encoder.layer.0.attention.self.value o=encoder.layer.0.attention.output.dense
attention encoder.layer.1.attention.self (sdpa): q=encoder.layer.1.attention.self.query k=encoder.layer.1.attention.self.key v=encoder.layer.1.attention.self.value o=encoder.layer.1.attention.output.dense""")

    def test_hand_written_transformer(self):
        torch.manual_seed(4)
        analysis = analyze(TinyTransformer(), FindAttention(), x=torch.randn(2, 8, HIDDEN))
        self.assertExpectedInline(describe(analysis), """\
attention blocks.0 (sdpa): q=blocks.0.wq k=blocks.0.wk v=blocks.0.wv o=blocks.0.wo
attention blocks.1 (sdpa): q=blocks.1.wq k=blocks.1.wk v=blocks.1.wv o=blocks.1.wo""")


def expected_attention(arch: str, layer: int) -> tuple[str, list[str]]:
    """(attention fqn, [q, k, v, o projections]) of one layer of a tiny HF model."""
    if arch == "gpt2":
        fqn = f"transformer.h.{layer}.attn"
        return fqn, [f"{fqn}.c_attn"] * 3 + [f"{fqn}.c_proj"]  # q, k, v split from one linear
    if arch == "bert":
        fqn = f"encoder.layer.{layer}.attention"
        return f"{fqn}.self", [f"{fqn}.self.query", f"{fqn}.self.key", f"{fqn}.self.value",
                               f"{fqn}.output.dense"]
    fqn = f"model.layers.{layer}.self_attn"
    return fqn, [f"{fqn}.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_every_layer_has_its_projections(arch: str, attn: str):
    seed = len(arch) + len(attn)
    analysis = analyze(hf_model(arch, attn, seed), FindAttention(), input_ids=token_ids(seed))
    assert [site.kind for site in analysis.attention] == [attn] * LAYERS
    for layer, site in enumerate(analysis.attention):
        fqn, projections = expected_attention(arch, layer)
        assert site.fqn == fqn
        assert [site.q_proj, site.k_proj, site.v_proj, site.o_proj] == projections


def test_lora_adapters_resolve_to_the_base_projection():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(hf_model("llama", "sdpa", 5),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    analysis = analyze(model, FindAttention(), input_ids=token_ids(5))
    assert len(analysis.attention) == LAYERS
    for layer, site in enumerate(analysis.attention):
        fqn = f"base_model.model.model.layers.{layer}.self_attn"
        assert site.fqn == fqn
        assert [site.q_proj, site.k_proj, site.v_proj, site.o_proj] == [
            f"{fqn}.q_proj.base_layer", f"{fqn}.k_proj", f"{fqn}.v_proj.base_layer",
            f"{fqn}.o_proj.base_layer",
        ]


def test_softmax_over_linear_logits_is_not_attention():
    torch.manual_seed(6)
    analysis = analyze(Router(), FindAttention(), x=torch.randn(8, HIDDEN),
                       experts=torch.randn(4, HIDDEN))
    assert analysis.attention == []
