"""compile_in_place's regional compilation: repeated blocks compiled once, every other linear
compiled on its own, the report naming every block's linears, and whole-model compilation where
regional compilation is not correct."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import halo_compile

transformers = pytest.importorskip("transformers")

from halo_compile.integrations import compile_in_place  # noqa: E402

FAST = {"compiler": "aot_eager", "min_features": 16}
LLAMA_BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llama(layers=4, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


def token_ids(seed=1, vocab=128):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def loss_and_grads(model, call, ids):
    for p in model.parameters():
        p.grad = None
    loss = call(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def compiled_and_eager(options, regional=None, seed=0):
    """(compiled model, its eager twin with the same weights); counters cleared."""
    torch._dynamo.reset()
    eager = tiny_llama(seed=seed)
    model = tiny_llama(seed=seed)
    counters.clear()
    compile_in_place(model, {**FAST, **options}, regional=regional)
    return model, eager


def test_llama_decoder_layers_compile_once_and_report_under_their_names(caplog):
    with caplog.at_level(logging.INFO, logger="halo_compile.integrations"):
        model, eager = compiled_and_eager({"format": "fp8_e4m3", "hadamard": "halo2"})
    assert "regionally" in caplog.text
    ids = token_ids()
    loss, grads = loss_and_grads(model, model, ids)
    # One graph for the four decoder layers, one for lm_head.
    assert counters["stats"]["unique_graphs"] == 2

    report = halo_compile.report(model)
    expected = [f"model.layers.{i}.{name}" for i in range(4) for name in LLAMA_BLOCK_LINEARS]
    assert [layer.fqn for layer in report.layers] == expected + ["lm_head"]
    assert all(layer.quantized and layer.format == "fp8_e4m3" for layer in report.layers)
    assert report["model.layers.0.mlp.down_proj"].shared_with == ""
    assert report["model.layers.3.mlp.down_proj"].shared_with == "model.layers.0"
    assert "graph shared with model.layers.0" in str(report)
    assert report["lm_head"].shared_with == ""

    eager_loss, eager_grads = loss_and_grads(eager, eager, ids)
    assert 1e-4 < rel_err(loss, eager_loss) < 0.05
    for name, grad in eager_grads.items():
        assert rel_err(grads[name], grad) < 0.3, name


def test_format_none_is_eager_loss_and_every_gradient():
    model, eager = compiled_and_eager({"format": "none", "hadamard": "halo2"})
    ids = token_ids(2)
    loss, grads = loss_and_grads(model, model, ids)
    eager_loss, eager_grads = loss_and_grads(eager, eager, ids)
    assert counters["stats"]["unique_graphs"] == 2
    assert rel_err(loss, eager_loss) < 1e-5
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert rel_err(grads[name], grad) < 1e-5, name


def test_regional_false_compiles_the_whole_model_as_one_graph():
    model, _ = compiled_and_eager({}, regional=False)
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    report = halo_compile.report(model)
    assert len(report.quantized) == 4 * 7 + 1
    assert not any(layer.shared_with for layer in report.layers)


def test_rotate_fused_compiles_the_whole_model(caplog):
    options = {"rotate": "fused", "format": "int8"}
    with caplog.at_level(logging.INFO, logger="halo_compile.integrations"):
        model, eager = compiled_and_eager(options)
    assert "one graph" in caplog.text and "rotate='fused'" in caplog.text
    ids = token_ids(3)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert counters["stats"]["unique_graphs"] == 1
        assert rel_err(out, eager(input_ids=ids).logits) < 0.1
    with pytest.raises(ValueError, match="rotate='fused'"):
        compile_in_place(tiny_llama(), {**FAST, **options}, regional=True)


def test_layer_globs_decide_whether_blocks_can_share_a_graph():
    # Every block alike: regional, the glob applied to every block.
    model, _ = compiled_and_eager({"layers": {"*.mlp.down_proj": {"format": "int8"},
                                              "lm_head": None}})
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 2
    report = halo_compile.report(model)
    assert [report[f"model.layers.{i}.mlp.down_proj"].format for i in range(4)] == ["int8"] * 4
    assert report["model.layers.2.mlp.up_proj"].format == "fp8_e4m3"
    assert not report["lm_head"].quantized
    # One block set apart: the blocks cannot share a graph.
    model, _ = compiled_and_eager({"layers": {"model.layers.1.*": {"format": "int8"}}})
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    report = halo_compile.report(model)
    assert report["model.layers.1.self_attn.q_proj"].format == "int8"
    assert report["model.layers.2.self_attn.q_proj"].format == "fp8_e4m3"
    with pytest.raises(ValueError, match=r"sets model\.layers\.0\.\S+ and model\.layers\.1\."):
        compile_in_place(tiny_llama(), {"layers": {"model.layers.1.*": None}}, regional=True)


def test_inf_nan_error_names_the_layer_and_its_shared_block():
    model, _ = compiled_and_eager({})
    ids = token_ids()
    model(input_ids=ids, labels=ids)  # compiles the block's graph from model.layers.0
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(halo_compile.NonFiniteInputError,
                       match=r"mlp\.up_proj in a block compiled once for all model\.layers\.\*"):
        model(input_ids=ids, labels=ids)


def test_recompile_limit_of_the_block_marks_every_block():
    model, _ = compiled_and_eager({})
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    with torch._dynamo.config.patch(recompile_limit=1), \
            pytest.warns(halo_compile.HaloFallbackWarning, match="compiled once for all"):
        with torch.no_grad():  # a new grad mode: a recompile the limit refuses
            model(input_ids=ids, labels=ids)
    report = halo_compile.report(model)
    for i in range(4):
        assert "recompile_limit" in report[f"model.layers.{i}.self_attn.q_proj"].fallback
    # lm_head's own frame recompiles for the grad mode too, and is marked on its own.
    assert "recompile_limit" in report["lm_head"].fallback


def test_bert_mlm_blocks_and_head_compile_regionally():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=32)
    model = transformers.BertForMaskedLM(config)
    counters.clear()
    compile_in_place(model, FAST)
    ids = token_ids(4)
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 2  # the encoder layers, the MLM head
    report = halo_compile.report(model)
    names = {layer.fqn for layer in report.quantized}
    for i in range(3):
        assert {f"bert.encoder.layer.{i}.attention.self.query",
                f"bert.encoder.layer.{i}.output.dense"} <= names
    assert {"cls.predictions.transform.dense", "cls.predictions.decoder"} <= names
    assert len(report.layers) == 3 * 6 + 2


def test_gpt2_blocks_and_tied_lm_head_compile_regionally():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4,
                                     n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    counters.clear()
    compile_in_place(model, FAST)
    ids = token_ids(5)
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 2  # the blocks, lm_head
    report = halo_compile.report(model)
    names = [layer.fqn for layer in report.quantized]
    assert names == [f"transformer.h.{i}.{name}" for i in range(3)
                     for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                     ] + ["lm_head"]
