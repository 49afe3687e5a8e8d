"""Autocast: halo's linears read their input as F.linear does under torch.autocast (cast to the
autocast dtype, computing and returning it), whether autocast is on around the compiled call,
entered inside the model's forward (as accelerate wraps it for the Trainer's bf16=True), or
around a checkpointed region; outside autocast, mismatched dtypes are refused as eager
refuses them."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint

import halo_compile
from halo_compile.passes.autocast_regions import autocast_dtypes

transformers = pytest.importorskip("transformers")

FAST = {"compiler": "aot_eager", "min_features": 16}
BF16 = torch.bfloat16


def _llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ids(seed=0, shape=(2, 24)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt,tolerance", [("none", 2e-2), ("fp8_e4m3", 0.1)])
def test_fp32_model_under_bf16_autocast_computes_as_eager_autocast(fmt, tolerance):
    """Output dtypes are eager autocast's (bf16 logits; fp32 gradients of the fp32 weights), and
    the values eager's up to bf16 rounding (format "none": the matmuls are the same bf16
    products, summed in another order) or FP8's error."""
    model = _llama()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="halo", options={"format": fmt, **FAST})
    ids = _ids()
    with torch.autocast("cpu", dtype=BF16):
        out = compiled(input_ids=ids, labels=ids)
        ref = eager(input_ids=ids, labels=ids)
    assert out.logits.dtype == ref.logits.dtype == BF16
    assert _rel(out.logits, ref.logits) < tolerance
    out.loss.backward()
    ref.loss.backward()
    for (name, mine), theirs in zip(model.named_parameters(), eager.parameters(), strict=False):
        assert mine.grad.dtype == theirs.grad.dtype == torch.float32, name
        assert _rel(mine.grad, theirs.grad) < 5 * tolerance, name
    assert len(halo_compile.report(compiled).quantized) == 15


class _AutocastInsideForward(nn.Module):
    """Autocast entered inside the compiled forward (accelerate's wrapper does this for the
    Trainer), around blocks that are checkpointed regions, one of them with autocast off."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU(),
                                                  nn.Linear(64, 64)) for _ in range(2))
        self.head = nn.Linear(64, 64)

    def forward(self, x):
        with torch.autocast("cpu", dtype=BF16):
            for block in self.blocks:
                y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                x = x + y
            with torch.autocast("cpu", enabled=False):
                return y, self.head(x)


@pytest.mark.parametrize("fmt", ["none", "fp8_e4m3"])
def test_autocast_inside_the_forward_reaches_checkpointed_regions(fmt):
    model = _AutocastInsideForward()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="halo", options={"format": fmt, **FAST})
    x = torch.randn(4, 8, 64)
    (block, head), (ref_block, ref_head) = compiled(x), eager(x)
    assert block.dtype == BF16 and ref_block.dtype == BF16  # inside the region
    assert head.dtype == torch.float32 and ref_head.dtype == torch.float32  # autocast off
    tolerance = 2e-2 if fmt == "none" else 0.1
    assert _rel(block, ref_block) < tolerance and _rel(head, ref_head) < tolerance
    (block.float().sum() + head.sum()).backward()
    report = halo_compile.report(compiled)
    assert {layer.fqn for layer in report.quantized} == {
        "blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "head"}, str(report)


def test_autocast_dtypes_follow_regions_in_the_graph():
    """The analysis: the dtype in effect at each node, from the state at the graph's entry and
    the graph's own `_enter_autocast` / `_exit_autocast` nodes (another device's regions change
    nothing)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def forward(x, w):
        a = x @ w
        with torch.autocast("cpu", dtype=BF16):
            b = a @ w
            with torch.autocast("cuda", enabled=False):
                c = b @ w
            with torch.autocast("cpu", enabled=False):
                d = c.float() @ w
        return a, b, c, d

    w = torch.randn(8, 8)
    torch.compile(forward, backend=capture, fullgraph=True)(torch.randn(4, 8), w)
    states = autocast_dtypes(graphs[0].graph, "cpu", None)
    matmuls = [states[n] for n in graphs[0].graph.nodes
               if n.op == "call_function" and "matmul" in str(n.target)]
    assert matmuls == [None, BF16, BF16, None]
    entered = autocast_dtypes(graphs[0].graph, "cpu", torch.float16)
    assert [entered[n] for n in graphs[0].graph.nodes
            if n.op == "call_function" and "matmul" in str(n.target)] == [torch.float16, BF16,
                                                                          BF16, None]


def test_mismatched_dtypes_are_refused_as_eager_refuses_them():
    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(4, 64, dtype=BF16)
    with pytest.raises(RuntimeError, match="same dtype"):
        model(x)
    with pytest.raises(RuntimeError, match=r"0: mat1 and mat2 must have the same dtype"):
        torch.compile(model, backend="halo", options=FAST)(x)
