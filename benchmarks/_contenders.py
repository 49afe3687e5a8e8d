"""The contenders the layer and decoder benchmarks compare, side by side in one process: bf16
Inductor, the halo backend at each HALO level, and torchao's float8 training recipes."""

from __future__ import annotations

import torch
import torch.nn as nn

import halo_compile  # noqa: F401  (registers the ops; the backend is an entry point)

HALO = {
    "halo fp8 no-Hadamard": {"format": "fp8_e4m3", "hadamard": "none"},
    "halo fp8 halo1": {"format": "fp8_e4m3", "hadamard": "halo1"},
    "halo fp8 halo2": {"format": "fp8_e4m3", "hadamard": "halo2"},
    # The forward GEMM accumulating in float32 (option fast_accum off).
    "halo fp8 halo2 fp32-accum": {"format": "fp8_e4m3", "hadamard": "halo2",
                                  "fast_accum": False},
    # What the deferred inf/NaN check costs per step.
    "halo fp8 halo2 unchecked": {"format": "fp8_e4m3", "hadamard": "halo2",
                                 "nonfinite": "propagate"},
    "halo fp8 all_inner": {"format": "fp8_e4m3", "hadamard": "all_inner"},
    # One scale per tensor (torchao's tensorwise recipe's GEMMs, 4-9% faster than row scales),
    # the Hadamard rotations spreading the outliers that a tensor scale would crush.
    "halo fp8 halo2 tensor-scale": {"format": "fp8_e4m3", "hadamard": "halo2",
                                    "scale": "tensor"},
    # grad_rounding="stochastic": dY rounded at random inside the quantize kernels.
    "halo fp8 halo2 stochastic": {"format": "fp8_e4m3", "hadamard": "halo2",
                                  "grad_rounding": "stochastic"},
    # HALO-2 with grad-weight rotated too (along the tokens): all three matmuls rotated, dY
    # quantized for both backward matmuls by one dual kernel.
    "halo fp8 halo2+gw": {"format": "fp8_e4m3",
                          "hadamard": {"forward": "inner", "grad_input": "outer",
                                       "grad_weight": "inner"}},
    # Weights quantized once per version: once per optimizer step under gradient accumulation.
    "halo fp8 halo2 cached-weights": {"format": "fp8_e4m3", "hadamard": "halo2",
                                      "cache_weights": True},
    # Every matmul rotated along its contraction dimension, weights cached: no dim 0 pass and no
    # un-rotation of grad-input's output (HALO-2's "outer" needs both).
    "halo fp8 all_inner cached-weights": {"format": "fp8_e4m3", "hadamard": "all_inner",
                                          "cache_weights": True},
    # Replayed as CUDA graphs: what the step costs once launch overhead is gone.
    "halo fp8 halo2 cudagraphs": {"format": "fp8_e4m3", "hadamard": "halo2", "cudagraphs": True},
}
# Inductor's autotuning (Triton GEMM templates measured against the library calls).
AUTOTUNED = {"bf16 inductor max-autotune": None, "halo fp8 halo2 max-autotune": "halo"}
TORCHAO = {"torchao float8 rowwise": "rowwise", "torchao float8 tensorwise": "tensorwise",
           "torchao float8 rowwise cudagraphs": "rowwise"}
# Most telling first, so that a run cut short still compares them.
NAMES = ("bf16 inductor", "halo fp8 halo2", "halo fp8 no-Hadamard", "torchao float8 rowwise",
         "torchao float8 tensorwise", "halo fp8 halo2 tensor-scale", "halo fp8 halo2 stochastic",
         "halo fp8 halo1", "halo fp8 all_inner", "halo fp8 halo2+gw",
         "halo fp8 halo2 unchecked", "halo fp8 halo2 fp32-accum", "halo fp8 halo2 cached-weights",
         "halo fp8 all_inner cached-weights", "bf16 inductor cudagraphs",
         "halo fp8 halo2 cudagraphs", "torchao float8 rowwise cudagraphs",
         "bf16 inductor max-autotune", "halo fp8 halo2 max-autotune")


# Every contender compiles the same code objects (nn.Linear.forward, the decoder layer's forward),
# each with its own backend, and all stay compiled for interleaved timing: one cache entry each.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def compile_fn(name: str, module: nn.Module):
    """Return (a compiled callable for `module`, None) or (None, the reason it is skipped).
    torchao converts the module (its nn.Linear children in place) before compiling."""
    # The non-halo contenders get CUDA graphs through Inductor's own mode.
    mode = "reduce-overhead" if name.endswith(" cudagraphs") else None
    if name in ("bf16 inductor", "bf16 inductor cudagraphs"):
        return torch.compile(module, mode=mode), None
    if name in HALO:
        return torch.compile(module, backend="halo", options=HALO[name]), None
    if name in AUTOTUNED:  # halo's default options: fp8, halo2
        backend = AUTOTUNED[name] or "inductor"
        return torch.compile(module, backend=backend, mode="max-autotune-no-cudagraphs"), None
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:  # torchao missing or built for another torch
        return None, f"torchao import failed: {e}"
    config = Float8LinearConfig.from_recipe_name(TORCHAO[name])
    # Swaps nn.Linear children in place; a bare nn.Linear comes back as a new module.
    module = convert_to_float8_training(module, config=config)
    return torch.compile(module, mode=mode), None


def parse_names(text: str):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; known: {list(NAMES)}")
    return names
