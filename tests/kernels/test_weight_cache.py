"""kernels/weight_cache.py: derived copies of frozen weights, computed once per weight version."""

import gc

import pytest
import torch

from halo_compile.kernels.hadamard import block_hadamard
from halo_compile.kernels.quantize import NonFiniteInputError, dequantize
from halo_compile.kernels.weight_cache import WeightCache, quantize_weight_reference


def _weight(seed, out_features=48, in_features=64, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    if outliers:  # a few input channels 100x: what the rotation is for
        w[:, torch.randperm(in_features, generator=g)[:2]] *= 100.0
    return torch.nn.Parameter(w, requires_grad=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fmt,bound", [("fp8_e4m3", 7e-2), ("int8", 2e-2)])
@pytest.mark.parametrize("transpose", [False, True])
def test_reference_dequantizes_to_the_rotated_weight(seed, fmt, bound, transpose):
    w = _weight(seed)
    q, scale = quantize_weight_reference(w, fmt, "row", 16, transpose=transpose)
    exact = block_hadamard((w.t() if transpose else w).double(), 16, dim=1)
    assert q.shape == exact.shape and scale.shape == (exact.shape[0], 1)
    error = (dequantize(q, scale).double() - exact).norm() / exact.norm()
    assert error < bound, error.item()


def test_reference_casts_to_the_operand_dtype_first():
    w = _weight(0, outliers=False)
    q, scale = quantize_weight_reference(w, "fp8_e4m3", "tensor", 0, dtype=torch.bfloat16)
    q_bf16, scale_bf16 = quantize_weight_reference(w.to(torch.bfloat16), "fp8_e4m3", "tensor", 0)
    assert torch.equal(q.view(torch.uint8), q_bf16.view(torch.uint8))
    assert torch.equal(scale, scale_bf16)


def test_reference_rejects_nonfinite_weights():
    w = _weight(0)
    with torch.no_grad():
        w[3, 5] = float("nan")
    with pytest.raises(NonFiniteInputError, match="layer.w"):
        quantize_weight_reference(w, "int8", "row", 0, where="layer.w")


def test_computed_once_per_version():
    cache, w = WeightCache(), _weight(0)
    first = cache.quantized(w, "fp8_e4m3", "row", 64)
    for _ in range(3):
        again = cache.quantized(w, "fp8_e4m3", "row", 64)
        assert again[0] is first[0] and again[1] is first[1]
    assert (cache.computations, cache.hits) == (1, 3)

    with torch.no_grad():
        w.mul_(0.5)  # an in-place write autograd sees bumps the version: recomputed once
    changed = cache.quantized(w, "fp8_e4m3", "row", 64)
    cache.quantized(w, "fp8_e4m3", "row", 64)
    assert (cache.computations, cache.hits) == (2, 4)
    assert torch.equal(changed[1], first[1] * 0.5)
    assert len(cache) == 1  # the stale entry was replaced, not kept


def test_each_setting_is_its_own_entry():
    cache, w = WeightCache(), _weight(1)
    settings = [("fp8_e4m3", "row", 64, False, None), ("fp8_e4m3", "row", 0, False, None),
                ("fp8_e4m3", "tensor", 64, False, None), ("int8", "row", 64, False, None),
                ("fp8_e4m3", "row", 16, True, None), ("fp8_e4m3", "row", 64, False, torch.bfloat16)]
    values = [cache.quantized(w, *s) for s in settings]
    assert cache.computations == len(settings) and len(cache) == len(settings)
    for (fmt, granularity, block, transpose, dtype), (q, scale) in zip(settings, values,
                                                                       strict=False):
        ref_q, ref_scale = quantize_weight_reference(w, fmt, granularity, block, transpose, dtype)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
        assert torch.equal(scale, ref_scale)


def test_a_view_never_gets_the_weights_entry():
    cache, w = WeightCache(), _weight(2, 64, 64)
    cache.quantized(w, "int8", "row", 0)
    q_view, _ = cache.quantized(w[:32], "int8", "row", 0)  # same storage, other layout
    assert cache.computations == 2 and q_view.shape == (32, 64)


def test_new_storage_through_data_is_seen():
    cache, w = WeightCache(), _weight(3)
    cache.quantized(w, "int8", "row", 0)
    w.data = torch.randn_like(w)  # peft's safe merge swaps the tensor like this
    q, scale = cache.quantized(w, "int8", "row", 0)
    ref_q, ref_scale = quantize_weight_reference(w, "int8", "row", 0)
    assert cache.computations == 2
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


def test_forget_drops_entries_that_data_writes_made_stale():
    cache, w, other = WeightCache(), _weight(4), _weight(5)
    cache.quantized(w, "int8", "row", 0)
    cache.quantized(other, "int8", "row", 0)
    w.data += 1.0  # in place through .data: the version counter does not move
    cache.forget([w])
    q, scale = cache.quantized(w, "int8", "row", 0)
    ref_q, ref_scale = quantize_weight_reference(w, "int8", "row", 0)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    cache.quantized(other, "int8", "row", 0)
    assert (cache.computations, cache.hits) == (3, 1)
    cache.forget()
    assert len(cache) == 0


def test_forget_cached_weights_of_a_model_of_tensors_or_all():
    """The public call after writing weights through `.data`: a module's, some tensors' or
    every entry of the cache the ops use goes; other weights keep theirs."""
    import halo_compile
    from halo_compile.kernels.weight_cache import WEIGHT_CACHE

    model = torch.nn.Linear(64, 48, bias=False).requires_grad_(False)
    other, third = _weight(6), _weight(7)
    weights = (model.weight, other, third)
    for given, forgotten in ((model, {0}), (other, {1}), ([other, third], {1, 2}),
                             (None, {0, 1, 2})):
        WEIGHT_CACHE.forget()
        for w in weights:
            WEIGHT_CACHE.quantized(w, "int8", "row", 0)
        halo_compile.forget_cached_weights(given)
        before = WEIGHT_CACHE.computations
        for w in weights:
            WEIGHT_CACHE.quantized(w, "int8", "row", 0)
        assert WEIGHT_CACHE.computations - before == len(forgotten), given


def test_entries_go_with_their_weight():
    cache, w = WeightCache(), _weight(6)
    cache.quantized(w, "fp8_e4m3", "row", 64)
    assert len(cache) == 1 and cache.nbytes() == 48 * 64 + 48 * 4  # fp8 values + fp32 scales
    del w
    gc.collect()
    assert len(cache) == 0 and cache.nbytes() == 0


def test_inference_tensors_are_never_cached():
    cache = WeightCache()
    with torch.inference_mode():
        w = torch.randn(32, 32)
    cache.quantized(w, "int8", "row", 0)
    cache.quantized(w, "int8", "row", 0)
    assert (cache.computations, cache.hits, len(cache)) == (2, 0, 0)


def test_get_memoizes_any_derivation():
    cache, w = WeightCache(), _weight(7)
    calls = []

    def fold(weight):
        calls.append(1)
        return weight * 2.0

    assert torch.equal(cache.get(w, "fold", fold), w * 2.0)
    assert cache.get(w, "fold", fold) is cache.get(w, "fold", fold)
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("transpose,block", [(False, 256), (True, 0), (True, 64)])
def test_cuda_weights_are_quantized_by_the_kernel(fmt, transpose, block):
    """On CUDA the cache's derivation is the fused kernel's (what the uncached compiled path
    computes), within one quantum of the reference's; an fp32 weight is cast to the operand
    dtype first."""
    from halo_compile.kernels.triton_hadamard_quantize import hadamard_quantize_triton
    from halo_compile.kernels.weight_cache import quantize_weight

    g = torch.Generator().manual_seed(3)
    w = torch.randn(1024, 768, generator=g)
    w[:, torch.randperm(768, generator=g)[:8]] *= 100.0
    w = w.cuda()
    q, scale = quantize_weight(w, fmt, "row", block, transpose, torch.bfloat16)
    b = (w.t() if transpose else w).to(torch.bfloat16)
    kq, kscale = hadamard_quantize_triton(b, fmt, "row", block)
    assert torch.equal(q.view(torch.uint8), kq.view(torch.uint8)) and torch.equal(scale, kscale)
    rq, rscale = quantize_weight_reference(w, fmt, "row", block, transpose, torch.bfloat16)
    torch.testing.assert_close(scale, rscale, rtol=1e-6, atol=0)
    steps = (dequantize(q, scale) - dequantize(rq, rscale)).abs() / scale
    assert steps.max().item() <= 1.0 + 1e-3 and (steps > 0.5).float().mean().item() < 1e-3


@pytest.mark.parametrize("optimizer_options", [{"foreach": False}, {"foreach": True},
                                               {"fused": True}], ids=str)
def test_optimizer_steps_make_entries_stale(optimizer_options):
    """Whatever the optimizer's implementation -- the fused ones write the weight without
    bumping its version counter -- its step makes the next call recompute the weights it
    updated, and only those."""
    from halo_compile.kernels.weight_cache import WEIGHT_CACHE, watch_optimizer_steps

    watch_optimizer_steps()
    trained, frozen = torch.nn.Parameter(torch.randn(32, 16)), _weight(1)
    optimizer = torch.optim.AdamW([trained, frozen], lr=0.1, **optimizer_options)
    trained.grad = torch.randn_like(trained)
    before = WEIGHT_CACHE.computations
    q, _ = WEIGHT_CACHE.quantized(trained, "int8", "row", 16)
    WEIGHT_CACHE.quantized(frozen, "int8", "row", 16)
    optimizer.step()
    q_new, _ = WEIGHT_CACHE.quantized(trained, "int8", "row", 16)
    WEIGHT_CACHE.quantized(frozen, "int8", "row", 16)
    assert WEIGHT_CACHE.computations - before == 3  # trained twice, frozen once
    assert not torch.equal(q, q_new)
    assert torch.equal(q_new, quantize_weight_reference(trained, "int8", "row", 16)[0])
