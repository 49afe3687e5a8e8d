"""Models and a graph capture shared by the analysis-pass tests: tiny HF models and a
hand-written pre-norm transformer, and `analyze`, which runs FindLinears and given passes on a
model's single Dynamo graph."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from halo_compile.config import HaloConfig
from halo_compile.passes.analysis import GraphAnalysis
from halo_compile.passes.context import PassContext
from halo_compile.passes.find_linears import FindLinears
from halo_compile.passes.graph_utils import GraphTensors

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
