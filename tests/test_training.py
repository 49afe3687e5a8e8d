"""Training with the halo backend: a tiny Llama learns a synthetic token stream as well as in fp32.

50 AdamW steps on a fixed, seeded Markov chain (each token has two successors, taken with
probability 3/4 and 1/4: the best achievable loss is H = 0.56 nats). The fp32 eager baseline and
the FP8 / INT8 halo2 runs see the same data from the same initial weights; their final losses
(mean of the last 5 steps) must agree within 3%.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import halo_compile

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, SEQ, STEPS, LR = 128, 8, 32, 50, 3e-3


def markov_stream(seed, steps=STEPS, batch=BATCH, seq=SEQ):
    """`steps` batches of token ids from a random sparse Markov chain (seeded, learnable)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 2), generator=g)
    batches = []
    for _ in range(steps):
        token = torch.randint(0, VOCAB, (batch,), generator=g)
        tokens = [token]
        for _ in range(seq - 1):
            second = (torch.rand(batch, generator=g) < 0.25).long()
            token = successors[token, second]
            tokens.append(token)
        batches.append(torch.stack(tokens, dim=1))
    return batches


def tiny_llama(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config).train()


def train(model, batches, options=None):
    step_model = model if options is None else torch.compile(model, backend="halo",
                                                             options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for ids in batches:
        logits = step_model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, step_model


def final_loss(losses):
    return sum(losses[-5:]) / 5


def test_fp8_and_int8_training_match_fp32():
    seed = 0
    model = tiny_llama(seed)
    batches = markov_stream(seed)

    baseline, _ = train(copy.deepcopy(model), batches)
    # The task is learnable and 50 steps learn much of it: the test can tell a broken gradient.
    assert baseline[0] > 4.0 and final_loss(baseline) < 0.3 * baseline[0]

    for fmt in ("fp8_e4m3", "int8"):
        torch._dynamo.reset()
        options = {"format": fmt, "hadamard": "halo2", "compiler": "aot_eager",
                   "min_features": 16}
        losses, compiled = train(copy.deepcopy(model), batches, options)
        report = halo_compile.report(compiled)
        assert len(report.layers) == 15 and all(
            layer.quantized and layer.format == fmt for layer in report.layers), str(report)
        assert all(torch.isfinite(torch.tensor(losses)))
        gap = abs(final_loss(losses) - final_loss(baseline)) / final_loss(baseline)
        assert gap < 0.03, (
            f"{fmt}: final loss {final_loss(losses):.4f} vs fp32 {final_loss(baseline):.4f} "
            f"({gap:.1%})")
        # Quantized training is not secretly fp32: the trajectories differ.
        assert losses != baseline


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop AdamW", "fused AdamW"])
def test_cached_weights_under_gradient_accumulation(fused):
    """Option cache_weights with 3 micro-batches per optimizer step: every quantized weight is
    quantized twice a step (forward, grad-input's transpose) instead of twice a micro-batch, the
    losses and weights stay exactly those of the uncached run, and the report says so. Also
    with a fused optimizer, whose update leaves the weights' version counters as they were."""
    from halo_compile.kernels.weight_cache import WEIGHT_CACHE

    model = tiny_llama(1)
    batches = markov_stream(1, steps=6)
    options = {"format": "fp8_e4m3", "hadamard": "halo2", "compiler": "aot_eager",
               "min_features": 16}

    def accumulate(model, options):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="halo", options=options)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused)
        losses, computations = [], []
        for step in range(2):
            before = WEIGHT_CACHE.computations
            for ids in batches[3 * step:3 * step + 3]:
                logits = compiled(input_ids=ids).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
                (loss / 3).backward()
                losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            computations.append(WEIGHT_CACHE.computations - before)
        return losses, computations, compiled

    plain_model, cached_model = copy.deepcopy(model), copy.deepcopy(model)
    plain, plain_computations, _ = accumulate(plain_model, options)
    cached, computations, compiled = accumulate(cached_model, {**options, "cache_weights": True})
    report = halo_compile.report(compiled)
    assert plain_computations == [0, 0]
    assert computations == [2 * len(report.quantized)] * 2 and len(report.quantized) == 15
    assert all(layer.weight_cache == "cached" for layer in report.layers)
    assert "weight cached per version" in str(report)
    assert cached == plain
    for p, p_plain in zip(cached_model.parameters(), plain_model.parameters(), strict=False):
        assert torch.equal(p, p_plain)
