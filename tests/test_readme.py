"""The README's recipes run as written: every ```python block under "## Recipes".

Each test runs the first recipe (it defines the tiny `config` the others use) and then its own
section's blocks, in a fresh namespace, in a temporary working directory. One substitution keeps
CI fast: Inductor's CPU compilation (~1 min per graph on 2 cores) is replaced by aot_eager;
halo's passes run unchanged, and Inductor itself is tested elsewhere.
"""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("Plain training loop", "Gradient accumulation",
            "Variable lengths and activation checkpointing", "Hugging Face Trainer", "PEFT / LoRA",
            "Per-layer flags", "The report in code")
NEEDS = {"The report in code": ("Per-layer flags",)}  # reads the model that section compiles


def recipes() -> dict[str, list[str]]:
    """Section title -> its python blocks, for the "### " sections under "## Recipes"."""
    text = README.read_text()
    part = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    sections = {}
    for chunk in part.split("\n### ")[1:]:
        title, body = chunk.split("\n", 1)
        sections[title.strip()] = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    return sections


def test_every_recipe_section_has_a_snippet():
    found = recipes()
    assert tuple(found) == SECTIONS
    assert all(found[title] for title in SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_recipe_runs(section, tmp_path, monkeypatch):
    import torch._inductor.compile_fx
    from torch._dynamo.backends.registry import lookup_backend

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx",
                        lambda gm, example_inputs, **kwargs: lookup_backend("aot_eager")(
                            gm, example_inputs))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    found = recipes()
    namespace: dict = {}
    for title in dict.fromkeys((SECTIONS[0], *NEEDS.get(section, ()), section)):
        for block in found[title]:
            exec(compile(block, f"README.md ({title})", "exec"), namespace)
    CHECKS[section](namespace, tmp_path)


def _saved_plain_keys(ns, out):
    assert set(torch.load(out / "model.pt")) == set(ns["model"].state_dict())


def _weights_quantized_once_per_step(ns, out):
    import halo_compile

    quantized = len(halo_compile.report(ns["cmodel"]).quantized)
    assert quantized == 15 and ns["WEIGHT_CACHE"].computations - ns["before"] == 2 * quantized


def _two_graphs_every_linear_quantized(ns, out):
    import halo_compile

    assert ns["graphs"] == 2
    report = halo_compile.report(ns["cmodel"])
    assert len(report.quantized) == len(report.layers) == 15 and not report.fell_back
    grad_input = report["model.layers.0.mlp.up_proj"].grad_input
    assert grad_input.rotation == "outer" and "tokens/256" in str(grad_input)


def _trainer_saved_model(ns, out):
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "halo-trainer" / "final")
    assert set(reloaded.state_dict()) == set(ns["model"].state_dict())


def _lora_quantized_once_and_merged(ns, out):
    import transformers

    assert ns["WEIGHT_CACHE"].computations > 0
    assert type(ns["merged"]) is transformers.LlamaForCausalLM


def _per_layer_flags_applied(ns, out):
    import halo_compile

    report = halo_compile.report(ns["cmodel"])
    assert not report["lm_head"].quantized
    assert report["model.layers.1.mlp.down_proj"].format == "int8"
    assert report["model.layers.0.self_attn.q_proj"].grad_weight.rotation == "inner"


def _report_read(ns, out):
    assert ns["down"].quantized


CHECKS = {
    "Plain training loop": _saved_plain_keys,
    "Gradient accumulation": _weights_quantized_once_per_step,
    "Variable lengths and activation checkpointing": _two_graphs_every_linear_quantized,
    "Hugging Face Trainer": _trainer_saved_model,
    "PEFT / LoRA": _lora_quantized_once_and_merged,
    "Per-layer flags": _per_layer_flags_applied,
    "The report in code": _report_read,
}
