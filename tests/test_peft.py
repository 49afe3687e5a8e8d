"""PEFT/LoRA models compiled with backend="halo": gradients reach only the adapters, the frozen
base weights are rotated and quantized once per weight version, and merged export works."""

import copy

import pytest
import torch
import torch.nn.functional as F

import halo_compile
from halo_compile.kernels.weight_cache import WEIGHT_CACHE

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, SEQ = 128, 16
# min_features 16: the tiny model's linears (64..128 features) and rank-16 adapters qualify by
# size, so what keeps the adapters in high precision is the adapter rule itself.
OPTIONS = {"format": "fp8_e4m3", "hadamard": "halo2", "compiler": "aot_eager", "min_features": 16}


def tiny_lora_llama(seed=0, rank=16, targets=("q_proj", "v_proj", "down_proj")):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                           target_modules=list(targets))
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    # peft starts B at zero; a trained adapter is nonzero, which the merge tests need.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def batches(seed, count=4, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, SEQ), generator=g) for _ in range(count)]


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def train(model, data, options=OPTIONS, lr=1e-2):
    step_model = model if options is None else torch.compile(model, backend="halo",
                                                             options=options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    computations = []
    for ids in data:
        loss = lm_loss(step_model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        computations.append(WEIGHT_CACHE.computations)
    return step_model, computations


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_lora_trains_only_adapters_with_frozen_bases_quantized_once():
    model = tiny_lora_llama()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    WEIGHT_CACHE.forget()
    compiled, computations = train(model, batches(0, count=5))

    # Quantized during the first step; later steps only read the cache.
    assert computations[0] > 0 and computations[1:] == [computations[0]] * 4
    assert WEIGHT_CACHE.nbytes() > 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "lora_" in name
        else:
            assert param.grad is None and torch.equal(param, frozen_before[name]), name

    report = halo_compile.report(compiled)
    base = "base_model.model.model.layers.0"
    for fqn in (f"{base}.self_attn.q_proj.base_layer", f"{base}.self_attn.k_proj",
                f"{base}.mlp.down_proj.base_layer", "base_model.model.lm_head"):
        assert report[fqn].quantized and report[fqn].frozen, fqn
    for fqn in (f"{base}.self_attn.q_proj.lora_A.default",
                f"{base}.self_attn.q_proj.lora_B.default"):
        assert not report[fqn].quantized and "LoRA adapter" in report[fqn].reason
    assert "frozen (cached weight)" in str(report)

    # A frozen weight edited in place (a new version) is quantized again, once.
    lm_head = model.base_model.model.lm_head.weight
    with torch.no_grad():
        lm_head.mul_(1.01)
    before = WEIGHT_CACHE.computations
    for ids in batches(1, count=2):
        lm_loss(compiled, ids).backward()
    # lm_head: its forward copy and its grad-input copy.
    assert WEIGHT_CACHE.computations - before == 2


def test_rotations_alone_give_eager_gradients():
    """format "none": every frozen-weight rotation cancels, so the adapters' gradients are
    eager's up to float32 rounding (catches a wrong transpose or rotation in the frozen path)."""
    eager, compiled = tiny_lora_llama(1), tiny_lora_llama(1)
    ids = batches(2, count=1)[0]
    lm_loss(eager, ids).backward()
    lm_loss(torch.compile(compiled, backend="halo",
                          options={**OPTIONS, "format": "none"}), ids).backward()
    grads = {n: p.grad for n, p in compiled.named_parameters() if p.requires_grad}
    assert len(grads) == 12
    for name, param in eager.named_parameters():
        if param.requires_grad:
            assert _rel(grads[name], param.grad) < 1e-5, name


def test_fp8_adapter_gradients_close_to_eager():
    eager, compiled = tiny_lora_llama(2), tiny_lora_llama(2)
    ids = batches(3, count=1)[0]
    lm_loss(eager, ids).backward()
    lm_loss(torch.compile(compiled, backend="halo", options=OPTIONS), ids).backward()
    eager_grads = dict(eager.named_parameters())
    for name, param in compiled.named_parameters():
        if param.requires_grad:
            # FP8 forward and grad-input through up to 2 layers; measured 2e-2 .. 6e-2.
            assert _rel(param.grad, eager_grads[name].grad) < 0.12, name


def test_adapters_quantized_by_flag():
    model = tiny_lora_llama(3)
    options = {**OPTIONS, "layers": {"*.q_proj.lora_*": {"adapters": "quantize"}}}
    compiled, _ = train(model, batches(4, count=1), options)
    report = halo_compile.report(compiled)
    base = "base_model.model.model.layers.1.self_attn"
    for fqn in (f"{base}.q_proj.lora_A.default", f"{base}.q_proj.lora_B.default"):
        assert report[fqn].quantized and not report[fqn].frozen, fqn
    assert not report[f"{base}.v_proj.lora_A.default"].quantized
    with pytest.raises(ValueError, match="adapters"):
        halo_compile.HaloConfig.from_options({"adapters": "fp8"})


def test_merge_and_unload_after_halo_training():
    model = tiny_lora_llama(4)
    train(model, batches(5, count=3))
    ids = batches(6, count=1)[0]
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert type(merged_model) is transformers.LlamaForCausalLM
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    assert _rel(merged, unmerged) < 1e-5


def test_merge_after_compiling_is_not_served_stale_weights():
    """peft's merge edits base weights through `.data` (no version bump); the recompilation it
    causes drops the cached copies, so the compiled model computes with the merged weights."""
    model = tiny_lora_llama(5).eval()
    ids = batches(7, count=1)[0]
    fresh = copy.deepcopy(model)
    compiled = torch.compile(model, backend="halo", options=OPTIONS)
    with torch.no_grad():
        compiled(input_ids=ids)  # caches the unmerged base weights
        model.merge_adapter()
        fresh.merge_adapter()
        after_merge = compiled(input_ids=ids).logits
        torch._dynamo.reset()
        expected = torch.compile(fresh, backend="halo", options=OPTIONS)(input_ids=ids).logits
    assert torch.equal(after_merge, expected)


def test_gpt2_conv1d_base_weights():
    """GPT-2 stores Conv1D weights [in, out] (peft: fan_in_fan_out): the transposed frozen path."""
    torch.manual_seed(6)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=1,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lora = peft.LoraConfig(r=16, target_modules=["c_attn"], fan_in_fan_out=True,
                           lora_dropout=0.0)
    eager = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)
    for name, param in eager.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    compiled = copy.deepcopy(eager)
    ids = batches(8, count=1)[0]
    lm_loss(eager, ids).backward()
    cmodel = torch.compile(compiled, backend="halo", options={**OPTIONS, "format": "none"})
    lm_loss(cmodel, ids).backward()
    report = halo_compile.report(cmodel)
    attn = report["base_model.model.transformer.h.0.attn.c_attn.base_layer"]
    assert attn.quantized and attn.frozen and attn.in_features == 64
    eager_grads = dict(eager.named_parameters())
    for name, param in compiled.named_parameters():
        if param.requires_grad:
            assert _rel(param.grad, eager_grads[name].grad) < 1e-5, name
