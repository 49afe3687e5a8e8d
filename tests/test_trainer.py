"""A real `transformers.Trainer` run with halo on CPU: train (with gradient accumulation),
evaluate, save, reload into a plain model with identical outputs."""

import pytest
import torch
from torch._dynamo.utils import counters

import halo_compile

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate: pip install -e .[hf]")

from halo_compile.integrations import HaloCallback, compile_in_place  # noqa: E402

VOCAB, SEQ = 128, 16
OPTIONS = {"format": "fp8_e4m3", "hadamard": "halo2", "compiler": "aot_eager", "min_features": 16}


class TokenDataset(torch.utils.data.Dataset):
    """Sequences from a seeded Markov chain (learnable), as causal-LM examples."""

    def __init__(self, count, seed):
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, VOCAB, (VOCAB,), generator=torch.Generator().manual_seed(0))
        tokens = [torch.randint(0, VOCAB, (count,), generator=g)]
        for _ in range(SEQ - 1):
            jump = torch.rand(count, generator=g) < 0.2
            tokens.append(torch.where(jump, torch.randint(0, VOCAB, (count,), generator=g),
                                      successors[tokens[-1]]))
        self.ids = torch.stack(tokens, dim=1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config)


def training_args(out, **overrides):
    settings = dict(
        output_dir=str(out), use_cpu=True, report_to="none", max_steps=4,
        per_device_train_batch_size=4, per_device_eval_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, save_strategy="no",
        disable_tqdm=True)
    return transformers.TrainingArguments(**{**settings, **overrides})


def test_trainer_train_evaluate_save_reload(tmp_path):
    model = tiny_llama()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    counters.clear()
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path),
                                   train_dataset=TokenDataset(64, 1),
                                   eval_dataset=TokenDataset(16, 2),
                                   callbacks=[HaloCallback(OPTIONS)])
    trainer.train()
    train_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    metrics = trainer.evaluate()

    assert len(train_losses) == 4 and all(torch.isfinite(torch.tensor(train_losses)))
    # A training and an evaluation graph for the decoder layers (compiled once for both
    # layers) and for lm_head: no recompilation per step or per accumulation micro-batch.
    assert counters["stats"]["unique_graphs"] == 4
    report = halo_compile.report(model)
    assert len(report.quantized) == 15 and not report.high_precision
    # Evaluation ran the quantized forward: close to the same weights evaluated eagerly.
    eager_loss = _eager_loss(model, TokenDataset(16, 2))
    assert abs(metrics["eval_loss"] / eager_loss - 1) < 0.02

    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert set(reloaded.state_dict()) == set(initial)  # no `_orig_mod.` keys
    assert any(not torch.equal(model.state_dict()[k], initial[k]) for k in initial)
    ids = TokenDataset(4, 3).ids
    # The trained model run eagerly: its blocks are compiled in place, so model.forward alone
    # would still run them compiled.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        eager = model.eval()(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, eager)


def _eager_loss(model, dataset):
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return model.eval()(input_ids=dataset.ids, labels=dataset.ids).loss.item()


def test_trainer_with_lora_saves_adapters_that_reload(tmp_path):
    base = tiny_llama(1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=2),
                                   train_dataset=TokenDataset(32, 4),
                                   callbacks=[HaloCallback(OPTIONS)])
    trainer.train()
    report = halo_compile.report(model)
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    assert report[f"{q_proj}.base_layer"].frozen
    assert not report[f"{q_proj}.lora_B.default"].quantized

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(1), str(tmp_path / "adapter"))
    ids = TokenDataset(4, 5).ids
    with torch.no_grad():
        with torch.compiler.set_stance("force_eager"):
            expected = model.eval()(input_ids=ids).logits
        assert torch.allclose(reloaded.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        # The adapters did train (B starts at zero).
        assert not torch.allclose(tiny_llama(1)(input_ids=ids).logits, expected, atol=1e-3)


def test_callback_refuses_a_second_compile_and_bad_options(tmp_path):
    with pytest.raises(ValueError, match="formatt"):
        HaloCallback({"formatt": "fp8_e4m3"})
    with pytest.raises(ValueError, match="torch_compile=False"):
        transformers.Trainer(model=tiny_llama(), args=training_args(tmp_path, torch_compile=True),
                             train_dataset=TokenDataset(8, 6), callbacks=[HaloCallback(OPTIONS)])


def test_compile_in_place_keeps_the_module():
    model = tiny_llama(2)
    keys = set(model.state_dict())
    assert compile_in_place(model, OPTIONS) is model and set(model.state_dict()) == keys
    ids = TokenDataset(2, 7).ids
    model(input_ids=ids, labels=ids).loss.backward()
    assert halo_compile.report(model)["lm_head"].quantized
    with pytest.raises(ValueError, match="hadamard"):
        compile_in_place(model, hadamard="halo9")


def test_trainer_with_cached_weights_and_fused_adamw(tmp_path):
    """Option cache_weights in a Trainer with gradient accumulation (2 micro-batches a step) and
    its fused AdamW, whose update leaves the weights' version counters as they were: each weight
    is quantized twice per optimizer step, and the run is exactly the uncached one."""
    from halo_compile.kernels.weight_cache import WEIGHT_CACHE

    def train(options, out):
        torch._dynamo.reset()
        model = tiny_llama(3)
        trainer = transformers.Trainer(
            model=model, args=training_args(out, optim="adamw_torch_fused"),
            train_dataset=TokenDataset(64, 4), callbacks=[HaloCallback(options)])
        before = WEIGHT_CACHE.computations
        trainer.train()
        assert getattr(trainer.optimizer, "optimizer", trainer.optimizer).defaults["fused"]
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return model, losses, WEIGHT_CACHE.computations - before

    plain, plain_losses, plain_computations = train(OPTIONS, tmp_path / "plain")
    cached, losses, computations = train({**OPTIONS, "cache_weights": True}, tmp_path / "cached")
    assert plain_computations == 0 and computations == 4 * 2 * 15  # 4 steps, W and Wᵀ, 15 linears
    assert losses == plain_losses
    for p, p_plain in zip(cached.parameters(), plain.parameters(), strict=False):
        assert torch.equal(p, p_plain)
