"""FindAttention on Dynamo graphs of tiny HF models and a hand-written transformer."""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from halo_compile.config import HaloConfig
from halo_compile.passes.analysis import GraphAnalysis
from halo_compile.passes.find_attention import FindAttention
from halo_compile.passes.find_linears import FindLinears
from halo_compile.passes.graph_utils import GraphTensors
from halo_compile.passes.manager import PassContext

HIDDEN, LAYERS, HEADS, VOCAB = 64, 2, 4, 128


def analyze(model: nn.Module, *passes, dynamic: bool = False, **inputs) -> GraphAnalysis:
    """Capture the model's single Dynamo graph and run FindLinears, then `passes`, on it. They run
    inside the backend, as in halo's: Dynamo drops the graph inputs' sources once it returns."""
    contexts = []

    def capture(gm, example_inputs):
        ctx = PassContext(gm, example_inputs, HaloConfig(), GraphTensors(gm, example_inputs))
        for graph_pass in (FindLinears(), *passes):
            graph_pass.run(ctx)
        contexts.append(ctx)
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True, dynamic=dynamic)(**inputs)
    ctx, = contexts
    return ctx.analysis


def hf_model(arch: str, attn: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, attn_implementation=attn)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                         n_positions=32, **common)
        return transformers.GPT2LMHeadModel(config)
    sizes = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, **common)
    if arch == "bert":
        return transformers.BertModel(transformers.BertConfig(max_position_embeddings=32, **sizes))
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    return model_cls(config_cls(num_key_value_heads=2, **sizes))  # GQA: repeat_kv in eager


def token_ids(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(1, VOCAB, (2, 8))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """Pre-norm block: RMSNorm + attention with SDPA and RoPE-like scaling + GELU MLP."""

    def __init__(self, dim: int = HIDDEN, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(dim)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.mlp_norm = RMSNorm(dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (w(h).view(b, t, self.heads, -1).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        q, k = q * rotation, k * rotation
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(o.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotation = torch.cos(torch.arange(HIDDEN // HEADS, dtype=x.dtype))
        for block in self.blocks:
            x = block(x, rotation)
        return self.head(x)


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
