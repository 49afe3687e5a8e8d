"""Helpers for judging quantization on small models: what real LLMs have and tiny ones lack."""

from __future__ import annotations

import torch


def inject_outlier_channels(model: torch.nn.Module, factor: float = 50.0) -> torch.nn.Module:
    """Give the activations entering a Llama-style model's linears (HF `LlamaForCausalLM`,
    Qwen2, Mistral) the outlier channels of real LLMs without changing its function: a few
    hidden channels of each RMSNorm's scale and a few intermediate channels of each up_proj's
    rows become `factor`x larger, and the weights that read them `factor`x smaller along those
    channels. Small or briefly trained models have no such channels, and outliers are what
    Hadamard rotations are for. Modifies `model` in place and returns it."""
    hidden = torch.tensor([5, 77, 100]) % model.config.hidden_size
    inner = torch.tensor([3, 200]) % model.config.intermediate_size
    with torch.no_grad():
        norms_and_readers = [(model.model.norm, [model.lm_head])]
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms_and_readers += [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                                  (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])]
            mlp.up_proj.weight[inner] *= factor
            mlp.down_proj.weight[:, inner] /= factor
        for norm, readers in norms_and_readers:
            norm.weight[hidden] *= factor
            for linear in readers:
                linear.weight[:, hidden] /= factor
    return model
