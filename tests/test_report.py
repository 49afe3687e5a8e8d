"""halo_compile.report: every linear of a model under its real name."""

import pytest
import torch

import halo_compile

transformers = pytest.importorskip("transformers")


def test_blocks_compiled_in_place_by_the_user_are_all_reported():
    """Per-block compile done by hand (`layer.compile(...)`, as under FSDP2): Dynamo compiles
    the first block and reuses its graph for the others, and the report lists every block's
    linears under their names, the others marked as sharing the first one's graph."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    for layer in model.model.layers:
        layer.compile(backend="halo", options={"compiler": "aot_eager", "min_features": 16})
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    report = halo_compile.report(model)
    decoder = {name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name}
    assert {layer.fqn for layer in report.quantized} == decoder, str(report)
    assert report["model.layers.2.mlp.down_proj"].shared_with == "model.layers.0"
    assert report["model.layers.0.mlp.down_proj"].shared_with == ""
