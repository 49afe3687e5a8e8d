"""End to end with activation checkpointing: Hugging Face's gradient checkpointing in both
reentrant modes, and torch.utils.checkpoint around a hand-written block. Every decoder linear is
quantized; format "none" equals eager; FP8 gradients are bit-identical to FP8 without
checkpointing (the backward recomputes exactly the forward's quantized values)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import halo_compile

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN = 256, 128
FAST = {"compiler": "aot_eager"}


def llama(checkpointing):
    """`checkpointing`: None, or HF's use_reentrant flag."""
    torch.manual_seed(0)
    # use_cache=False: with it on, HF logs a warning under checkpointing, a Dynamo graph break.
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, use_cache=False)
    model = transformers.LlamaForCausalLM(config).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    return model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x):
        return x + self.down(F.silu(self.up(self.norm(x))))


class CheckpointedModel(nn.Module):
    def __init__(self, checkpointing):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.checkpointing = checkpointing

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return self.head(x)


def handwritten(checkpointing):
    torch.manual_seed(0)
    return CheckpointedModel(checkpointing is not None)


MODELS = {  # name -> (make(checkpointing), the checkpointing mode it is tested with)
    "llama_reentrant": (llama, True),
    "llama_non_reentrant": (llama, False),
    "handwritten": (handwritten, False),
}


def loss_and_grads(model, ids):
    for p in model.parameters():
        p.grad = None
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    module = getattr(model, "_orig_mod", model)
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def linear_fqns(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))


def batch():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_format_none_equals_eager_and_every_linear_is_rewritten(name):
    make, mode = MODELS[name]
    model = make(mode)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="halo",
                             options={"format": "none", "hadamard": "halo2", **FAST},
                             fullgraph=True)
    ids = batch()
    ref_loss, ref_grads = loss_and_grads(ref, ids)
    loss, grads = loss_and_grads(compiled, ids)
    # The rotations cancel exactly: as close as test_backend's rotation invariance.
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for pname, ref_grad in ref_grads.items():
        assert rel_err(grads[pname], ref_grad) < 1e-5, pname

    report = halo_compile.report(compiled)
    assert sorted(layer.fqn for layer in report.layers) == linear_fqns(model)
    for layer in report.layers:
        assert layer.quantized and layer.format == "none", (layer.fqn, layer.reason)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp8_with_checkpointing_is_bit_identical_to_fp8_without(name):
    make, mode = MODELS[name]
    ids = batch()
    options = {"format": "fp8_e4m3", "hadamard": "halo2", "grad_rounding": "nearest", **FAST}
    results = {}
    for checkpointing in (mode, None):
        torch._dynamo.reset()
        model = make(checkpointing)
        ref = copy.deepcopy(model)
        compiled = torch.compile(model, backend="halo", options=options, fullgraph=True)
        results[checkpointing] = loss_and_grads(compiled, ids)
        report = halo_compile.report(compiled)
        assert sorted(layer.fqn for layer in report.quantized) == linear_fqns(model)
    ref_loss, ref_grads = loss_and_grads(ref, ids)
    (loss, grads), (plain_loss, plain_grads) = results[mode], results[None]

    # FP8 stays close to eager (the bounds of test_backend's FP8 test).
    assert abs(loss.item() - ref_loss.item()) < 0.02 * abs(ref_loss.item())
    for pname, ref_grad in ref_grads.items():
        assert rel_err(grads[pname], ref_grad) < 0.3, pname
    # The backward recomputes the checkpointed layers with the same halo ops on the same
    # inputs: the same quantized values, so the same loss and gradients to the bit. A
    # recomputation that quantized differently (or not at all) would change them.
    assert loss.item() == plain_loss.item()
    for pname, plain_grad in plain_grads.items():
        assert torch.equal(grads[pname], plain_grad), pname


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_autocast_entered_inside_the_compiled_code_reaches_checkpointed_regions(reentrant):
    """An autocast block inside the compiled code (accelerate wraps the model's forward in one:
    the Trainer's bf16=True) is recorded in the outer graph only; the checkpointed regions'
    linears compute under it, in bf16 as F.linear does, from fp32 weights."""

    def loss_under_bf16(model, ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))

    def loss_and_grads_of(fn, model, ids):
        loss = fn(model, ids)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    model = llama(reentrant)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(loss_under_bf16, backend="halo",
                             options={"format": "none", "hadamard": "none", **FAST})
    loss, grads = loss_and_grads_of(compiled, model, ids)
    ref_loss, ref_grads = loss_and_grads_of(loss_under_bf16, ref, ids)

    assert abs(loss.item() / ref_loss.item() - 1) < 1e-5
    # bf16 roundings of the gradients (0.6% measured; fp32 weights' grads, summed in bf16)
    for name, ref_grad in ref_grads.items():
        assert rel_err(grads[name], ref_grad) < 0.02, name
    report = halo_compile.report(model)
    assert sorted(layer.fqn for layer in report.quantized) == linear_fqns(model)
