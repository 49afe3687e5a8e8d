"""End to end: torch.compile(model, backend="halo") on tiny Hugging Face models and a hand-written
transformer. Everything but one test compiles with {"compiler": "aot_eager"} (our passes and
AOTAutograd, without Inductor's C++ compile) to keep the suite fast on a CPU."""

import copy
import fnmatch
import importlib.metadata
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halo_compile
from halo_compile import _flags

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, SEQ, BATCH = 128, 64, 128, 2, 4, 16, 2
FAST = {"compiler": "aot_eager", "min_features": 16}
FP8_HALO2 = {"format": "fp8_e4m3", "hadamard": "halo2", **FAST}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    """A hand-written decoder: no Hugging Face code involved."""

    def __init__(self, vocab=VOCAB, dim=HIDDEN, heads=HEADS, hidden=INTERMEDIATE, layers=LAYERS):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=True)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _hf_decoder(config_cls, model_cls):
    def make():
        config = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            num_key_value_heads=2, max_position_embeddings=64)
        return model_cls(config)
    return make


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS,
        n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config)


MODELS = {
    "llama": _hf_decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": _hf_decoder(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": _hf_decoder(transformers.MistralConfig, transformers.MistralForCausalLM),
    "gpt2": _gpt2,
    "bert": _bert,
    "handwritten": TinyTransformer,
}

# Gradients that are exactly zero in exact arithmetic, so that both eager and compiled hold only
# rounding noise: softmax(q·(k + b)) does not depend on a bias b added to every key.
ANALYTICALLY_ZERO_GRADS = {"bert": ("encoder.layer.*.attention.self.key.bias",)}


def make_model(name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]()
    model.train()
    return model


def make_batch(name, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    # A fixed random projection of Bert's outputs, so that every output element gets a gradient.
    proj = torch.randn(HIDDEN, generator=g)
    return ids, proj


def run(name, model, batch):
    """Forward and loss: (the output tensor compared across runs, the scalar loss)."""
    ids, proj = batch
    if name == "bert":
        out = model(input_ids=ids)
        loss = (out.last_hidden_state @ proj).square().mean() + (out.pooler_output @ proj).mean()
        return out.last_hidden_state, loss
    # Next-token loss computed here, not by HF's `labels=` path (whose one-time logger warning
    # is a Dynamo graph break in some models, e.g. GPT-2: not ours to test).
    logits = model(ids) if name == "handwritten" else model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    return logits, loss


def linear_fqns(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def compile_halo(model, options, **kwargs):
    return torch.compile(model, backend="halo", options=options, **kwargs)


def forward_backward(name, model, batch):
    for p in model.parameters():
        p.grad = None
    out, loss = run(name, model, batch)
    loss.backward()
    module = getattr(model, "_orig_mod", model)  # parameter names without the compile wrapper
    return out.detach(), loss.detach(), {n: p.grad for n, p in module.named_parameters()}


def _is_analytically_zero(name, param_name):
    return any(fnmatch.fnmatchcase(param_name, pattern)
               for pattern in ANALYTICALLY_ZERO_GRADS.get(name, ()))


def assert_grads_match(name, grads, ref_grads, tol):
    assert grads.keys() == ref_grads.keys()
    total = math.sqrt(sum(g.double().norm().item() ** 2 for g in ref_grads.values()))
    for pname, ref in ref_grads.items():
        grad = grads[pname]
        assert ref is not None, f"{pname}: no gradient in eager (the test's loss must reach it)"
        assert grad is not None, f"{pname}: no gradient through the halo backend"
        if _is_analytically_zero(name, pname):
            # Rounding noise on both sides: check it is noise-sized, not the relative error.
            assert grad.norm() <= 1e-6 * total and ref.norm() <= 1e-6 * total, pname
            continue
        err = rel_err(grad, ref)
        assert err < tol, f"{pname}: gradient relative error {err:.3g} >= {tol}"


# --------------------------------------------------------------------------------------------
# (a) + (b): FP8 halo2 forward and backward, fullgraph; the report lists every linear once
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp8_halo2_forward_backward_fullgraph(name):
    model = make_model(name)
    ref = copy.deepcopy(model)
    batch = make_batch(name, seed=1)
    ref_out, ref_loss, ref_grads = forward_backward(name, ref, batch)

    # fullgraph=True: any graph break (ours or the model's) is an error.
    compiled = compile_halo(model, FP8_HALO2, fullgraph=True)
    out, loss, grads = forward_backward(name, compiled, batch)

    assert torch.isfinite(loss) and torch.isfinite(out).all()
    # Quantized, so not equal to eager; but close: FP8 with rotations keeps ~2-3 significant bits
    # per element and the errors average out over the contraction.
    err = rel_err(out, ref_out)
    assert 1e-4 < err < 0.1, f"output relative error {err:.3g}"
    assert abs(loss.item() - ref_loss.item()) < 0.02 * abs(ref_loss.item())
    for pname, grad in grads.items():
        assert grad is not None, f"{pname}: no gradient"
        assert torch.isfinite(grad).all(), pname
        if not _is_analytically_zero(name, pname):
            assert rel_err(grad, ref_grads[pname]) < 0.3, pname

    # (b) the report: every nn.Linear / Conv1D exactly once, all quantized with halo2.
    report = halo_compile.report(compiled)
    fqns = [layer.fqn for layer in report.layers]
    assert len(fqns) == len(set(fqns)), f"duplicates in the report: {fqns}"
    assert sorted(fqns) == linear_fqns(model)
    for layer in report.layers:
        assert layer.quantized, f"{layer.fqn}: {layer.reason}"
        assert layer.format == "fp8_e4m3" and layer.scale == "row"
        assert layer.forward.rotation == "inner" and layer.forward.block > 0
        assert layer.grad_input.rotation == "outer"
        assert layer.grad_weight.rotation == "none"
    assert f"{len(fqns)} of {len(fqns)} linears quantized" in str(report)

    # A second batch reuses the compiled graph and is as close.
    batch2 = make_batch(name, seed=2)
    out2, _, _ = forward_backward(name, compiled, batch2)
    ref_out2, _, _ = forward_backward(name, ref, batch2)
    assert 1e-4 < rel_err(out2, ref_out2) < 0.1


def test_report_lists_each_linear_once_across_graph_breaks():
    """A model Dynamo must split: each graph is compiled by halo, the report merges them, and
    the halo backend adds no graph break of its own (same count as the eager backend)."""

    class Broken(TinyTransformer):
        def forward(self, input_ids):
            x = self.blocks[0](self.embed(input_ids))
            torch._dynamo.graph_break()
            x = self.blocks[1](x)
            torch._dynamo.graph_break()
            return self.head(self.norm(x))

    _check_graph_breaks(Broken)


@pytest.mark.xfail(strict=True, reason=(
    "known issue: a graph break inside a loop over submodules makes Dynamo skip the model's frame "
    "and compile each Block.forward on its own (one graph shared by all blocks): the report "
    "names layers relative to the block ('attn.q'), lists one block only, and the lm head, "
    "called from the skipped frame, is never compiled (stays float32, absent from the report)"))
def test_report_across_graph_break_in_loop():
    class BrokenInLoop(TinyTransformer):
        def forward(self, input_ids):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
                torch._dynamo.graph_break()
            return self.head(self.norm(x))

    _check_graph_breaks(BrokenInLoop)


def _check_graph_breaks(model_cls):
    batch = make_batch("handwritten", seed=3)
    breaks = {}
    for backend, options in (("eager", None), ("halo", FP8_HALO2)):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        model = model_cls()
        ref = copy.deepcopy(model)
        compiled = torch.compile(model, backend=backend,
                                 **({"options": options} if options else {}))
        out, _, _ = forward_backward("handwritten", compiled, batch)
        breaks[backend] = sum(torch._dynamo.utils.counters["graph_break"].values())
        if backend == "halo":
            report = halo_compile.report(compiled)
            fqns = [layer.fqn for layer in report.layers]
            assert len(fqns) == len(set(fqns)), fqns
            assert sorted(fqns) == linear_fqns(model)
            assert all(layer.quantized for layer in report.layers)
            ref_out, _, _ = forward_backward("handwritten", ref, batch)
            assert 1e-4 < rel_err(out, ref_out) < 0.1
    assert breaks["eager"] > 0  # the model does break ...
    assert breaks["halo"] == breaks["eager"]  # ... and halo adds none


# --------------------------------------------------------------------------------------------
# (c) format "none": the rotations cancel exactly, so logits and every gradient equal eager
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hadamard", ["all_inner", "halo2"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_rotations_are_invariant(name, hadamard):
    model = make_model(name)
    ref = copy.deepcopy(model)
    compiled = compile_halo(model, {"format": "none", "hadamard": hadamard, **FAST},
                            fullgraph=True)
    for seed in (11, 12):
        batch = make_batch(name, seed)
        ref_out, ref_loss, ref_grads = forward_backward(name, ref, batch)
        out, loss, grads = forward_backward(name, compiled, batch)
        assert rel_err(out, ref_out) < 1e-5
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
        assert_grads_match(name, grads, ref_grads, tol=1e-5)
    report = halo_compile.report(compiled)
    assert sorted(layer.fqn for layer in report.layers) == linear_fqns(model)
    # The layers were rewritten (format "none" is still a halo op) with rotations applied.
    for layer in report.layers:
        assert layer.quantized and layer.format == "none"
        assert layer.forward.rotation == "inner" and layer.forward.block >= 16
    if hadamard == "all_inner":
        assert any(layer.grad_weight.block >= 16 for layer in report.layers)


# --------------------------------------------------------------------------------------------
# (d) the one test through Inductor
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_llama_forward_backward():
    name = "llama"
    model = make_model(name)
    aot = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    batch = make_batch(name, seed=21)
    ref_out, ref_loss, ref_grads = forward_backward(name, ref, batch)

    options = {"format": "fp8_e4m3", "hadamard": "halo2", "min_features": 16}  # Inductor
    compiled = compile_halo(model, options, fullgraph=True)
    out, loss, grads = forward_backward(name, compiled, batch)
    aot_out, aot_loss, aot_grads = forward_backward(
        name, compile_halo(aot, {**options, "compiler": "aot_eager"}, fullgraph=True), batch)

    # Inductor runs the same quantized ops as aot_eager: equal up to float32 reordering around
    # them (an FP8 rounding may flip on a few elements, hence not bit-exact; a flip in a
    # gradient's dY reaches the first layer's weight gradients through every layer: 1.5% there).
    assert rel_err(out, aot_out) < 1e-3
    assert abs(loss - aot_loss) < 1e-3 * abs(aot_loss)
    for pname, grad in grads.items():
        assert rel_err(grad, aot_grads[pname]) < 3e-2, pname
    # And it is quantized: measurably different from, but close to, fp32 eager.
    assert 1e-4 < rel_err(out, ref_out) < 0.1
    assert abs(loss - ref_loss) < 0.02 * abs(ref_loss)
    report = halo_compile.report(compiled)
    assert sorted(layer.fqn for layer in report.layers) == linear_fqns(model)
    assert all(layer.quantized and layer.format == "fp8_e4m3" for layer in report.layers)


# --------------------------------------------------------------------------------------------
# (e) the backend is found by name through the entry point, without importing halo_compile
# --------------------------------------------------------------------------------------------


def test_backend_found_by_name_via_entry_point():
    code = textwrap.dedent("""
        import sys
        import torch
        assert "halo_compile" not in sys.modules
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
        c = torch.compile(m, backend="halo", options={"compiler": "aot_eager", "min_features": 16})
        x = torch.randn(4, 64)
        y = c(x)
        y.square().sum().backward()
        assert "halo_compile" in sys.modules  # loaded by torch through the entry point
        import halo_compile
        report = halo_compile.report(c)
        print(sorted(l.fqn for l in report.layers if l.quantized))
        err = ((y - m(x)).norm() / m(x).norm()).item()
        assert 1e-5 < err < 0.1, err  # quantized: close to, not equal to, float32
        print("OK")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-2:] == ["['0', '2']", "OK"]


def test_top_level_folders_import_as_the_installed_packages():
    """Run from a checkout, `kernels/` and `passes/` are importable as top-level packages.
    transformers imports `kernels`, Hugging Face's package of that name (a dependency of
    transformers 5): a bare import must give that package where it is installed, and otherwise
    halo_compile's installed one (never the ops registered a second time)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        importlib.metadata.distribution("kernels")  # Hugging Face's, installed
        has_hf_kernels = True
    except importlib.metadata.PackageNotFoundError:
        has_hf_kernels = False
    folder = os.path.join(root, "kernels") + os.sep  # (a virtualenv may live in the checkout)
    code = textwrap.dedent(f"""
        import sys
        import halo_compile.kernels, halo_compile.passes
        import kernels, passes
        assert passes is halo_compile.passes
        if {has_hf_kernels}:
            import transformers
            transformers.LlamaForCausalLM  # imports kernels' hub integration
            ours = [name for name, module in sys.modules.items()
                    if name.split(".")[0] == "kernels"
                    and (getattr(module, "__file__", None) or "").startswith({folder!r})]
            assert kernels is not halo_compile.kernels and not ours, ours
        else:
            assert kernels is halo_compile.kernels
            assert not any(name.startswith("kernels.") for name in sys.modules)
        assert not any(name.startswith("passes.") for name in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=300)


# --------------------------------------------------------------------------------------------
# CUDA graphs (options {"cudagraphs": True} or mode="reduce-overhead")
# --------------------------------------------------------------------------------------------


def _inductor_patches(monkeypatch, **backend_kwargs):
    """The config patches halo_backend hands to Inductor's compile_fx."""
    import torch._inductor.compile_fx as compile_fx_module

    from halo_compile.backend import halo_backend

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 64)))
    halo_backend(gm, [torch.randn(2, 64)], **backend_kwargs)
    return seen


@pytest.mark.parametrize("kwargs", [{"options": {"cudagraphs": True}},
                                    {"mode": "reduce-overhead"}])
def test_cudagraphs_turn_on_inductor_cudagraphs_and_partitioning(monkeypatch, kwargs):
    patches = _inductor_patches(monkeypatch, **kwargs)
    assert patches["triton.cudagraphs"] is True and patches["graph_partition"] is True
    assert patches["post_grad_custom_post_pass"].copy_scales is True


@pytest.mark.parametrize("kwargs", [{}, {"mode": "default"}, {"options": {"min_features": 16}}])
def test_no_cudagraphs_by_default(monkeypatch, kwargs):
    patches = _inductor_patches(monkeypatch, **kwargs)
    assert "triton.cudagraphs" not in patches
    assert patches["post_grad_custom_post_pass"].copy_scales is False


@pytest.mark.parametrize("mode,cudagraphs", [("max-autotune", True),
                                             ("max-autotune-no-cudagraphs", False)])
def test_max_autotune_modes_pass_inductors_settings_through(monkeypatch, mode, cudagraphs):
    patches = _inductor_patches(monkeypatch, mode=mode)
    assert patches["max_autotune"] is True and patches["coordinate_descent_tuning"] is True
    assert patches.get("triton.cudagraphs", False) is cudagraphs
    assert patches.get("graph_partition", False) is cudagraphs  # CUDA graphs as halo makes them
    assert patches["post_grad_custom_post_pass"].copy_scales is cudagraphs


def test_unsupported_mode_is_an_error():
    from halo_compile.backend import halo_backend

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(ValueError, match="unsupported mode 'fastest'"):
        halo_backend(gm, [torch.randn(2, 64)], mode="fastest")


def test_ops_with_host_side_work_stay_out_of_cuda_graphs():
    """They queue deferred inf/NaN checks or read the weight cache on every call: a graph
    replay would skip that, so Inductor must partition them out (cudagraph-unsafe)."""
    unsafe = torch.Tag.cudagraph_unsafe
    for name in ("report_nonfinite", "checked_scale", "scaled_matmul", "quantized_linear",
                 "frozen_weight_matmul", "cached_quantized_weight", "frozen_linear",
                 "emulated_quantized_linear"):
        assert unsafe in getattr(torch.ops.halo, name).default.tags, name
    # The kernels themselves are pure: captured like any other kernel.
    for name in ("hadamard_quantize", "int8_scaled_mm"):
        assert unsafe not in getattr(torch.ops.halo, name).default.tags, name


def test_cudagraphs_on_a_torch_without_partitioning_is_an_error(monkeypatch):
    import halo_compile.backend as backend

    monkeypatch.setattr(backend, "HOST_SIDE_TAGS", ())  # as on a torch without the tag
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(ValueError, match="'cudagraphs' needs Inductor's graph partitioning"):
        backend.halo_backend(gm, [torch.randn(2, 64)], options={"cudagraphs": True})


# --------------------------------------------------------------------------------------------
# Inductor settings for halo's Triton kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [True, False])
def test_kernels_use_inductors_static_launcher_where_inductor_does(monkeypatch, static):
    from torch._inductor import config as inductor_config

    if not hasattr(inductor_config, "static_launch_user_defined_triton_kernels"):
        pytest.skip(f"torch {torch.__version__} has no static launch of user-defined kernels")
    with inductor_config.patch(use_static_cuda_launcher=static):
        patches = _inductor_patches(monkeypatch)
    assert patches.get("static_launch_user_defined_triton_kernels", False) is static


def test_shared_inputs_of_kernels_are_realized_once(monkeypatch):
    from torch._inductor.lowering import needs_realized_inputs

    kernel = torch.ops.higher_order.triton_kernel_wrapper_mutation
    needs_realized_inputs.discard(kernel)  # as a fresh process has it
    _inductor_patches(monkeypatch)
    assert kernel in needs_realized_inputs


def test_inductor_patches_apply_once_and_say_so(monkeypatch, caplog):
    """Applying the patches again changes nothing, and each change is logged at DEBUG."""
    import logging

    from torch._inductor.lowering import needs_realized_inputs

    from halo_compile import inductor_patches

    kernel = torch.ops.higher_order.triton_kernel_wrapper_mutation
    needs_realized_inputs.discard(kernel)  # as a fresh process has it
    with caplog.at_level(logging.DEBUG, logger="halo_compile.inductor_patches"):
        first, second = inductor_patches.apply(), inductor_patches.apply()
    assert first == second and kernel in needs_realized_inputs
    assert sum("needs_realized_inputs" in r.getMessage() for r in caplog.records) == 1


def test_benchmark_flags_leave_inductor_as_is(monkeypatch):
    """benchmarks/decoder_step.py --as-is: the private flags turn the settings off."""
    from torch._inductor.lowering import needs_realized_inputs

    from halo_compile import inductor_patches

    kernel = torch.ops.higher_order.triton_kernel_wrapper_mutation
    needs_realized_inputs.discard(kernel)
    monkeypatch.setattr(_flags, "realize_user_kernel_inputs", False)
    monkeypatch.setattr(_flags, "static_launch", False)
    assert inductor_patches.apply() == {}
    assert kernel not in needs_realized_inputs
    monkeypatch.undo()
    inductor_patches.apply()  # as the other tests expect it
    assert kernel in needs_realized_inputs


def test_a_torch_without_inductors_realization_set_still_compiles(monkeypatch):
    import torch._inductor.lowering as lowering

    monkeypatch.delattr(lowering, "needs_realized_inputs")
    assert "post_grad_custom_post_pass" in _inductor_patches(monkeypatch)


def _stores_of_kernels_computing(code: str, op: str) -> int:
    """How many tensors the Inductor-generated Triton kernels in `code` named after `op` (Inductor
    names a fused kernel after the ops it computes: `triton_poi_fused_mul_silu_0`) store."""
    kernels = re.findall(r"async_compile\.triton\('(\w+)', '''(.*?)'''", code, re.DOTALL)
    return sum(source.count("tl.store(") for name, source in kernels if op in name)


def _silu_gate_stores(monkeypatch, realize: bool):
    """Stores of the SiLU-gate kernels in a compiled SwiGLU MLP's forward and backward, with
    or without halo_compile.inductor_patches.realize_user_kernel_inputs."""
    from torch._inductor.lowering import needs_realized_inputs
    from torch._inductor.utils import run_and_get_code

    if not realize:
        monkeypatch.setattr(_flags, "realize_user_kernel_inputs", False)
        needs_realized_inputs.discard(torch.ops.higher_order.triton_kernel_wrapper_mutation)
    torch.manual_seed(0)
    mlp = MLP(512, 1024).to("cuda", torch.bfloat16)
    compiled = torch.compile(mlp, backend="halo", options={"format": "fp8_e4m3",
                                                           "hadamard": "halo2"}, fullgraph=True)
    x = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        y = compiled(x)
        y.backward(torch.ones_like(y))
        return y

    with torch._inductor.config.patch(force_disable_caches=True):  # compile both times
        y, codes = run_and_get_code(step)
    monkeypatch.undo()
    assert len(codes) == 2, codes  # forward, backward
    torch.testing.assert_close(y, mlp(x), rtol=0.1, atol=0.1)
    return tuple(_stores_of_kernels_computing(code, "silu") for code in codes)


@pytest.mark.gpu
def test_gpu_silu_gate_product_is_stored_once_for_every_kernel_reading_it(monkeypatch):
    """The SiLU-gate product feeds the down projection's quantize kernels (its rows, and its
    transpose for grad-weight); Inductor left alone stores it once per kernel launch that reads
    it, and its gradients once per launch of the gate and up projections' backward kernels."""
    realized = _silu_gate_stores(monkeypatch, realize=True)
    as_is = _silu_gate_stores(monkeypatch, realize=False)
    assert realized[0] == 1 < as_is[0] and realized[1] < as_is[1], (realized, as_is)


def test_inductor_never_writes_into_the_weight_caches_tensors():
    """`halo::cached_quantized_weight` returns the cache's own tensors. Inductor computes a
    pointwise result of the same size into a dead input's buffer (`q + 1` into q's): that
    would overwrite the cache, unless the backend's lowering marks the op's outputs as never
    reused -- as it does."""
    from halo_compile.kernels.settings import MatmulSettings, WeightSource
    from halo_compile.kernels.weight_cache import WEIGHT_CACHE

    weight = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
    args = ([], WeightSource().encoded,
            MatmulSettings("int8", check_finite=False, where="w").encoded, 0, torch.float32)

    def f(w):
        q, scale = torch.ops.halo.cached_quantized_weight(w, *args)
        return q + 1, scale * 2

    q, scale = torch.ops.halo.cached_quantized_weight(weight, *args)
    q_before, scale_before = q.clone(), scale.clone()
    with torch._inductor.config.patch(force_disable_caches=True):
        out, doubled = torch.compile(f, backend="halo")(weight)
    assert torch.equal(out, q_before + 1) and torch.equal(doubled, scale_before * 2)
    assert torch.equal(q, q_before) and torch.equal(scale, scale_before)
    assert WEIGHT_CACHE.quantized(weight, "int8", "row", 0, dtype=torch.float32)[0] is q
