"""On the GPU: the halo backend through Inductor with the real FP8 (`torch._scaled_mm`) and INT8
(`halo::int8_scaled_mm`, a Triton kernel) GEMMs, on a small Llama in bf16. Skipped without CUDA."""

import copy

import pytest
import torch

import halo_compile
from halo_compile.kernels.settings import LinearSettings

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.gpu


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def _train(model, batches, steps, cudagraphs=False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        if cudagraphs:  # a new step: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt,grad_rounding", [("fp8_e4m3", "nearest"), ("int8", "nearest"),
                                               ("fp8_e4m3", "stochastic")])
def test_training_on_gpu_tracks_bf16(fmt, grad_rounding):
    torch.manual_seed(0)
    base = _tiny_llama()
    batches = [torch.randint(0, 64, (4, 128), device="cuda") for _ in range(4)]
    reference = _train(torch.compile(copy.deepcopy(base)), batches, 30)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(base), backend="halo",
                             options={"format": fmt, "hadamard": "halo2",
                                      "grad_rounding": grad_rounding})
    losses = _train(compiled, batches, 30)
    report = halo_compile.report(compiled)
    assert len(report.quantized) == 15, str(report)
    final, final_ref = sum(losses[-5:]) / 5, sum(reference[-5:]) / 5
    assert abs(final - final_ref) / final_ref < 0.05, (losses, reference)


def test_gemm_kernels_are_called():
    """The CUDA kernel of halo::scaled_matmul runs cuBLASLt FP8 and the INT8 matmul for real."""
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for fmt in ("fp8_e4m3", "int8"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            settings = LinearSettings(fmt, "row", "inner", "outer", "none", 256, "nearest", True,
                                      "test", False)
            y = torch.ops.halo.quantized_linear(x, w, None, settings.encoded)
            y.backward(torch.randn_like(y))
        names = {event.name for event in prof.events()}
        expected = "aten::_scaled_mm" if fmt == "fp8_e4m3" else "halo::int8_scaled_mm"
        assert expected in names, sorted(names)


def test_cuda_graphs_replay_the_same_training_and_still_report_nonfinite():
    """options {"cudagraphs": True}: the compiled graphs replay as CUDA graphs (no launch
    overhead) with the same losses, and the inf/NaN report, which runs outside the graphs, still
    sees every step's scales."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base = _tiny_llama()
    batches = [torch.randint(0, 64, (4, 128), device="cuda") for _ in range(4)]
    options = {"format": "fp8_e4m3", "hadamard": "halo2"}
    reference = _train(torch.compile(copy.deepcopy(base), backend="halo", options=options),
                       batches, 6)
    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(base)
    compiled = torch.compile(model, backend="halo", options={**options, "cudagraphs": True})
    losses = _train(compiled, batches, 6, cudagraphs=True)
    torch.testing.assert_close(losses, reference, rtol=1e-2, atol=0)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        _train(compiled, batches, 1, cudagraphs=True)
    assert any(e.name == "cudaGraphLaunch" for e in prof.events())
    # A NaN in a weight, after the graphs were recorded: the replayed step reports it.
    halo_compile.raise_pending_nonfinite()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    torch.compiler.cudagraph_mark_step_begin()
    ids = batches[0]
    compiled(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(halo_compile.NonFiniteInputError, match=r"layers\.1\.mlp\.up_proj"):
        halo_compile.raise_pending_nonfinite()


def test_cached_weights_under_gradient_accumulation_on_gpu():
    """Option cache_weights through Inductor: 3 micro-batches per optimizer step quantize each
    weight twice a step (the cache's misses, by the fused kernel), and the training follows the
    uncached run's."""
    from halo_compile.kernels.weight_cache import WEIGHT_CACHE

    torch.manual_seed(0)
    base = _tiny_llama()
    batches = [torch.randint(0, 64, (4, 128), device="cuda") for _ in range(6)]

    def accumulate(options):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend="halo", options=options)
        # fused: the optimizer the decoder benchmark uses; its in-place update must bump the
        # weights' version counters, or the second step would reuse stale quantized weights
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        losses, computations = [], []
        for step in range(2):
            before = WEIGHT_CACHE.computations
            for ids in batches[3 * step:3 * step + 3]:
                loss = compiled(input_ids=ids, labels=ids).loss
                (loss / 3).backward()
                losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            computations.append(WEIGHT_CACHE.computations - before)
        return losses, computations, halo_compile.report(compiled)

    options = {"format": "fp8_e4m3", "hadamard": "halo2"}
    plain, plain_computations, _ = accumulate(options)
    cached, computations, report = accumulate({**options, "cache_weights": True})
    assert plain_computations == [0, 0]
    assert len(report.quantized) == 15 and computations == [30, 30], str(report)
    torch.testing.assert_close(cached, plain, rtol=1e-3, atol=0)


def test_a_nonfinite_cached_weight_is_reported():
    """A cached weight is not checked when it is quantized: the GEMM's scale check covers it."""
    torch.manual_seed(0)
    model = _tiny_llama()
    compiled = torch.compile(model, backend="halo", options={"cache_weights": True})
    ids = torch.randint(0, 64, (4, 128), device="cuda")
    compiled(input_ids=ids, labels=ids).loss.backward()
    halo_compile.raise_pending_nonfinite()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[3, 5] = float("inf")  # bumps its version
    compiled(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(halo_compile.NonFiniteInputError, match=r"layers\.0\.self_attn\.o_proj"):
        halo_compile.raise_pending_nonfinite()


@pytest.mark.parametrize("hadamard", ["halo2", "all_inner"])
def test_variable_lengths_on_gpu_compile_two_graphs(hadamard):
    """Dynamic padding through Inductor and the Triton kernels: a new sequence length and batch
    size each step compiles one static and one dynamic graph, and every step's loss and
    gradients track bf16 Inductor's on the same weights (token counts not multiples of the
    token block: the along-token rotations pad them)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _tiny_llama()
    shapes = [(2, 128), (3, 77), (4, 200), (2, 33), (3, 301), (4, 64), (2, 150), (3, 9)]
    counters.clear()
    compiled = torch.compile(model, backend="halo", options={"hadamard": hadamard})
    reference = torch.compile(copy.deepcopy(model))
    for step, (batch, length) in enumerate(shapes):
        ids = torch.randint(0, 512, (batch, length), device="cuda")
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        ref_loss = reference(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.02, step
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=False):
            if p.grad is None:
                continue
            rel = ((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()).item()
            assert rel < 0.2, (step, name, rel)
        model.zero_grad()
        reference.zero_grad()
    report = halo_compile.report(compiled)
    assert len(report.quantized) == 15, str(report)
    # halo's graphs (one static, one dynamic) and the bf16 reference's (the same two)
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])


def test_autocast_on_gpu_follows_eager_dtypes():
    """An fp32 model under bf16 autocast (the Trainer's bf16=True): halo's linears compute and
    return bf16, as F.linear does under autocast, with the FP8 GEMMs."""
    torch.manual_seed(0)
    model = _tiny_llama().float()
    ids = torch.randint(0, 512, (4, 128), device="cuda")
    compiled = torch.compile(copy.deepcopy(model), backend="halo")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(input_ids=ids, labels=ids)
        ref = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == ref.logits.dtype == torch.bfloat16
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < 0.02
    out.loss.backward()
    assert len(halo_compile.report(compiled).quantized) == 15


def test_gradient_checkpointing_on_gpu_quantizes_every_layer():
    torch.manual_seed(0)
    model = _tiny_llama()
    model.config.use_cache = False
    reference = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    compiled = torch.compile(model, backend="halo")
    ids = torch.randint(0, 512, (4, 256), device="cuda")
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.02
    report = halo_compile.report(compiled)
    assert len(report.quantized) == 15, str(report)
