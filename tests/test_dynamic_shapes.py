"""Variable-length batches: the token count stays symbolic through halo's passes and ops, so a
model trained on many sequence lengths and batch sizes compiles as few graphs as plain
torch.compile does (one static graph, then one dynamic graph), and computes what eager does."""

import copy

import pytest
import torch

import halo_compile

transformers = pytest.importorskip("transformers")

FAST = {"compiler": "aot_eager", "min_features": 16}
# Every placement along the tokens: forward and grad-input "outer", grad-weight "inner".
TOKEN_ROTATIONS = {"forward": "outer", "grad_input": "outer", "grad_weight": "inner"}
# 12 sequence lengths and 3 batch sizes; the second batch changes both, as a shuffled
# dynamically padded data set does, so that Dynamo's second graph has both sizes dynamic.
SHAPES = [(2, 16), (3, 21), (4, 9), (2, 33), (3, 17), (4, 40), (2, 5), (3, 64), (4, 27),
          (2, 48), (3, 11), (4, 70)]


def _llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4)
    return transformers.LlamaForCausalLM(config)


def _batch(batch, length, seed):
    ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(autouse=True)
def _count_graphs_from_zero():
    from torch._dynamo.utils import counters

    counters.clear()


def _graphs() -> int:
    """Graphs Dynamo compiled since the test began."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _train(model, compiled, shapes, check):
    """One forward and backward per shape, each compared with eager by `check(loss, eager
    loss, grads, eager grads)` on a copy of the model with the same weights."""
    for step, (batch, length) in enumerate(shapes):
        eager = copy.deepcopy(model)
        inputs = _batch(batch, length, step)
        loss = compiled(**inputs).loss
        loss.backward()
        eager_loss = eager(**inputs).loss
        eager_loss.backward()
        check(loss, eager_loss, {n: p.grad for n, p in model.named_parameters()},
              {n: p.grad for n, p in eager.named_parameters()})
        model.zero_grad()


def _equal_to_eager(loss, eager_loss, grads, eager_grads):
    assert _rel(loss, eager_loss) < 1e-5
    for name, grad in grads.items():
        assert _rel(grad, eager_grads[name]) < 1e-4, name


def _close_to_eager(tolerance):
    def check(loss, eager_loss, grads, eager_grads):
        assert _rel(loss, eager_loss) < tolerance / 5
        for name in ("model.layers.0.self_attn.q_proj.weight",
                     "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
            assert _rel(grads[name], eager_grads[name]) < tolerance, name
    return check


@pytest.mark.parametrize("options,check", [
    ({"format": "none", "hadamard": TOKEN_ROTATIONS}, _equal_to_eager),
    ({"format": "fp8_e4m3", "hadamard": "halo2"}, _close_to_eager(0.15)),
    ({"format": "int8", "hadamard": TOKEN_ROTATIONS}, _close_to_eager(0.1)),
], ids=["none", "fp8-halo2", "int8-tokens"])
def test_many_lengths_and_batch_sizes_compile_two_graphs(options, check):
    model = _llama()
    compiled = torch.compile(model, backend="halo", options={**options, **FAST})
    _train(model, compiled, SHAPES, check)
    assert _graphs() == 2
    report = halo_compile.report(compiled)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {layer.fqn for layer in report.quantized} == linears and not report.high_precision


def test_halo_compiles_no_more_graphs_than_plain_torch_compile():
    """Shapes that change the length first, then the batch: plain torch.compile makes a third
    graph when the batch first changes; halo makes exactly as many."""
    from torch._dynamo.utils import counters

    shapes = [(2, 16), (2, 23), (2, 9), (3, 16), (4, 31), (3, 7)]
    counts = {}
    for backend in ("aot_eager", "halo"):
        torch._dynamo.reset()
        counters.clear()
        model = _llama()
        kwargs = {"options": {"format": "fp8_e4m3", **FAST}} if backend == "halo" else {}
        compiled = torch.compile(model, backend=backend, **kwargs)
        for step, (batch, length) in enumerate(shapes):
            compiled(**_batch(batch, length, step)).loss.backward()
        counts[backend] = _graphs()
    assert counts["halo"] == counts["aot_eager"] == 3


def test_dynamic_true_compiles_one_graph_for_every_length():
    model = _llama()
    compiled = torch.compile(model, backend="halo", dynamic=True,
                             options={"format": "none", "hadamard": TOKEN_ROTATIONS, **FAST})
    _train(model, compiled, SHAPES[:5], _equal_to_eager)
    assert _graphs() == 1


def test_mark_dynamic_compiles_one_graph_for_every_length():
    model = _llama()
    compiled = torch.compile(model, backend="halo", options={"format": "fp8_e4m3", **FAST})
    for step, (batch, length) in enumerate(SHAPES[:5]):
        inputs = _batch(batch, length, step)
        for tensor in inputs.values():
            torch._dynamo.mark_dynamic(tensor, 0)
            torch._dynamo.mark_dynamic(tensor, 1)
        compiled(**inputs).loss.backward()
    assert _graphs() == 1


def test_dynamic_false_compiles_one_graph_per_shape():
    model = _llama()
    compiled = torch.compile(model, backend="halo", dynamic=False,
                             options={"format": "fp8_e4m3", **FAST})
    for step, (batch, length) in enumerate(SHAPES[:3]):
        compiled(**_batch(batch, length, step)).loss.backward()
    assert _graphs() == 3


def test_the_cuda_decomposition_traces_symbolic_token_counts(monkeypatch):
    """The path Inductor compiles on CUDA (kernels/inductor_decompositions.py), traced on the CPU
    with the kernels' reference bodies: symbolic token counts go through the padding, the dual
    quantization of dY and the un-rotation without a guard on their value, and compute what
    the opaque ops compute: the same loss, and gradients up to FP8 roundings that summation order
    flips (float32 sums in another order; exact for one linear, tests/kernels)."""
    from torch._dynamo.utils import counters

    import halo_compile.kernels.inductor_decompositions as decompositions

    options = {"format": "fp8_e4m3", "hadamard": {"forward": "inner", "grad_input": "outer",
                                                  "grad_weight": "inner"}, **FAST}
    shapes = SHAPES[:6]
    reference = _llama()
    model = copy.deepcopy(reference)
    compiled_reference = torch.compile(reference, backend="halo", options=options)
    losses = [compiled_reference(**_batch(b, n, s)).loss for s, (b, n) in enumerate(shapes)]

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(decompositions, "fused_device", lambda t: True)
    blocks_along_tokens = _record_blocks_along_tokens(monkeypatch)
    compiled = torch.compile(model, backend="halo", options=options)
    for step, (batch, length) in enumerate(shapes):
        loss = compiled(**_batch(batch, length, step)).loss
        assert _rel(loss, losses[step]) < 1e-6
        loss.backward()
        losses[step].backward()
        for (name, mine), theirs in zip(model.named_parameters(), reference.parameters(),
                                        strict=False):
            assert _rel(mine.grad, theirs.grad) < 0.05, name
        model.zero_grad()
        reference.zero_grad()
    assert _graphs() == 2
    # Every quantization along the (padded) tokens kept its block: dY for both gradients (one
    # dual call), Xᵀ for grad-weight; the dynamic graph's too.
    assert blocks_along_tokens and set(blocks_along_tokens) == {256}


def _record_blocks_along_tokens(monkeypatch) -> list:
    """The blocks of the kernels' quantizations of operands with a dimension of at least 256
    (here: only the padded tokens; the test's token counts are below 256, features 64-128), as
    the graphs are traced."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    import halo_compile.kernels.triton_hadamard_quantize as kernel

    blocks = []
    for name, block_at in (("hadamard_quantize_reference", 3),
                           ("hadamard_quantize_dual_reference", 2)):
        body = getattr(kernel, name)

        def recording(x, *args, body=body, block_at=block_at):
            # (traced with the graph: decided without a guard on a symbolic size)
            if any(statically_known_true(size >= 256) for size in x.shape):
                blocks.append(args[block_at - 1])
            return body(x, *args)

        monkeypatch.setattr(kernel, name, recording)
    return blocks
