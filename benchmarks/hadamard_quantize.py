"""Bandwidth of the fused Hadamard + quantize Triton kernel against a copy (x.clone()).

    python benchmarks/hadamard_quantize.py [--markdown out.md] [--sweep] [--only TEXT]
    python benchmarks/hadamard_quantize.py --layer halo2 [--tokens 4096] [--sweep]

GB/s counts the bytes read once and written once (input, 8-bit values, float32 scales); the copy
reads and writes the input; "us" is one call's time. Timed as CUDA graphs
(triton.testing.do_bench_cudagraph, median), so launch overhead is left out. Variants: the
layouts the three matmuls of a linear need (rows, a transposed view for grad-weight, rotation
along dim 0 for the "outer" grad-input, and the last two at once: the dual). --sweep also times
launch configurations (BLOCK_M, NT, num_warps, split) of each variant: the strided ones at both
shapes, rows at the larger; --only picks variants by name. Each variant's default launch is also
timed rounding stochastically (grad_rounding="stochastic": what the random bits cost).
--layer times instead every quantization that one Llama-3-8B decoder layer's training step makes
(its seven linears' three matmuls, at --tokens tokens, with the rotations of a `hadamard` preset
or "forward,grad_input,grad_weight"), with the operands that linears share quantized once, as
the compiled step does: the table says what each costs per step and in all, against a copy of the
same bytes, and --sweep times each at the launch configurations of its layout. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from _timing import emit, markdown_table

from halo_compile.config import parse_hadamard
from halo_compile.kernels.triton_hadamard_quantize import (
    MAX_BLOCK,
    hadamard_quantize_dual_triton,
    hadamard_quantize_triton,
)

SHAPES = [(8192, 4096), (8192, 14336)]
# name -> (operand builder from a [tokens, features] bf16 tensor, dim, fmt, granularity, block);
# dim "dual": dim 0's and the transposed view's (rotated along the tokens) at once
# (hadamard_quantize_dual_triton)
VARIANTS = {
    "rows, fp8 row, block 256": (lambda t: t, 1, "fp8_e4m3", "row", 256),
    "rows, fp8 row, no rotation": (lambda t: t, 1, "fp8_e4m3", "row", 0),
    "rows, int8 tensor, block 256": (lambda t: t, 1, "int8", "tensor", 256),
    "transposed view (grad-weight), fp8 row, block 256": (lambda t: t.t(), 1, "fp8_e4m3", "row",
                                                          256),
    "transposed view, fp8 row, no rotation": (lambda t: t.t(), 1, "fp8_e4m3", "row", 0),
    "dim 0 (outer grad-input), fp8 row, block 256": (lambda t: t, 0, "fp8_e4m3", "row", 256),
    "dual: dim 0 + transposed view of dY, fp8 row, block 256": (lambda t: t, "dual", "fp8_e4m3",
                                                                "row", 256),
}
SWEEP = {
    "rows": [dict(block_m=bm, nt=nt, num_warps=w) for bm, nt, w in
             [(1, 4, 4), (2, 2, 4), (1, 1, 1), (4, 1, 4)]],
    # Strided lines: Triton's default pipelining (3 stages) keeps ~100 KiB of shared memory per
    # program at BLOCK_M 64 (kernel_resources.py), 64 KiB with 1 stage, 32 KiB at BLOCK_M 32.
    # Lines per program against programs per launch (a [T, 4096] operand's transposed view has
    # 4096 lines: 64 programs at BLOCK_M 64 unless K is split), at both shapes.
    "strided": [dict(block_m=bm, split=sp)
                for bm, sp in itertools.product((16, 32, 64), (1, 2, 4, 8))],
    # A transposed view not rotated (a kernel of its own): tiles of BLOCK_M lines x BLOCK_K K
    # indices, `tiles` of them per program of the quantize launch, the absmax launch's K split.
    "transpose": [dict(block_m=bm, block_k=bk, num_warps=w, tiles=t) for bm, bk, w, t in
                  [(64, 64, 4, 1), (64, 64, 4, 2), (64, 64, 4, 8), (64, 64, 8, 4),
                   (128, 64, 4, 4), (128, 64, 8, 4), (32, 64, 4, 4), (64, 128, 4, 4),
                   (64, 128, 8, 4), (64, 32, 4, 4), (128, 128, 8, 2), (32, 128, 4, 4)]]
    + [dict(split=sp) for sp in (1, 8, 16)],
    # dim 0: a program owns 256 tokens and loops over BLOCK_M features at a time, in one of
    # `split` ranges of the features (the default aims at ~4 programs per SM).
    # (BLOCK_M 16 measured half as fast on an H200, for dim 0 and the dual.)
    "dim0": [dict(block_m=bm, num_warps=w) for bm, w in itertools.product((32, 64), (4, 8))]
    + [dict(split=sp) for sp in (8, 32)] + [dict(num_stages=st) for st in (2, 4)],
}


# One Llama-3-8B decoder layer's linears: name -> (out, in, the activation they read). Linears
# that read one activation share its quantization (kernels/shared_operands.py).
LLAMA3_8B_LINEARS = {
    "q_proj": (4096, 4096, "attention input"), "k_proj": (1024, 4096, "attention input"),
    "v_proj": (1024, 4096, "attention input"), "o_proj": (4096, 4096, "attention output"),
    "gate_proj": (14336, 4096, "MLP input"), "up_proj": (14336, 4096, "MLP input"),
    "down_proj": (4096, 14336, "SiLU-gate product"),
}


def _block(size: int) -> int:
    """The Hadamard block of a dimension: its largest power-of-two divisor, at most MAX_BLOCK
    (halo's default hadamard_block)."""
    return min(size & -size, MAX_BLOCK)


def layer_quantizations(hadamard, tokens: int, linears=LLAMA3_8B_LINEARS) -> list:
    """The quantize calls of one decoder layer's step: [(operand, shape, view, dim, block)],
    view "rows" (the [lines, K] tensor itself) or "transposed" (a view of a tensor of
    the transposed shape), dim 0, 1 or "dual"; with the rotations of `hadamard` (a
    halo_compile.config.Hadamard) on forward X Wᵀ, grad-input dY W and grad-weight dYᵀ X."""
    calls = {}  # (operand, shape, view, dim, block) -> None: an ordered set

    for name, (out, inp, activation) in linears.items():
        x, dy, w = ("X: " + activation, (tokens, inp)), (f"dY: {name}", (tokens, out)), \
            (f"W: {name}", (out, inp))
        calls[(*x, "rows", 1, _block(inp) if hadamard.forward == "inner" else 0)] = None
        calls[(*w, "rows", 1, _block(inp) if hadamard.forward == "inner" else 0)] = None
        gi_block = _block(out) if hadamard.grad_input == "inner" else 0
        gw_block = _block(tokens) if hadamard.grad_weight == "inner" else 0
        if hadamard.grad_input == "outer" and hadamard.grad_weight == "inner":
            calls[(*dy, "rows", "dual", _block(tokens))] = None
        else:
            if hadamard.grad_input == "outer":
                calls[(*dy, "rows", 0, _block(tokens))] = None
            else:
                calls[(*dy, "rows", 1, gi_block)] = None
            calls[(*dy, "transposed", 1, gw_block)] = None
        calls[(*w, "transposed", 1, gi_block)] = None
        calls[(*x, "transposed", 1, gw_block)] = None
    return list(calls)


def timed(nbytes: int, fn) -> "tuple[float, float]":
    """(GB/s, microseconds) of one call."""
    fn()
    ms = triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return nbytes / (ms * 1e-3) / 1e9, ms * 1e3


def quantize_call(x, dim, fmt, granularity, block, config):
    """(the bytes it reads once and writes once, the call) of a variant: x's quantization along
    `dim` (0, 1 or "dual") with the launch overrides `config`."""
    dual = dim == "dual"
    scales = sum(x.shape) if dual else x.shape[0] if granularity == "row" else 1
    nbytes = x.numel() * (x.element_size() + (2 if dual else 1)) + scales * 4
    if dual:
        return nbytes, lambda: hadamard_quantize_dual_triton(x, fmt, block, **config)
    return nbytes, lambda: hadamard_quantize_triton(x, fmt, granularity, block, dim, **config)


def configs_of(x, dim, block, sweep: bool) -> list:
    """The default launch, and with `sweep` those of x's layout."""
    layout = ("dim0" if dim in (0, "dual") else "rows" if x.stride(1) == 1
              else "strided" if block else "transpose")
    return [{}] + (SWEEP[layout] if sweep else [])


STOCHASTIC = {"rounding": "stochastic"}  # the default launch, rounding stochastically


def _label(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "default"


def kernel_table(args) -> None:
    rows = []
    for m, k in SHAPES:
        t = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        copy, us = timed(2 * t.numel() * t.element_size(), lambda: t.clone())
        rows.append((f"{m}x{k}", "copy (x.clone())", "-", f"{copy:.0f}", "100%", f"{us:.0f}"))
        print(rows[-1], flush=True)
        for name, (build, dim, fmt, gran, block) in VARIANTS.items():
            if args.only not in name:
                continue
            x = build(t)
            sweep = args.sweep and (x.stride(1) != 1 or dim != 1 or (m, k) == SHAPES[-1])
            # (rows swept at the larger shape only)
            for config in configs_of(x, dim, block, sweep) + [STOCHASTIC]:
                bw, us = timed(*quantize_call(x, dim, fmt, gran, block, config))
                rows.append((f"{m}x{k}", name, _label(config), f"{bw:.0f}", f"{bw / copy:.0%}",
                             f"{us:.0f}"))
                print(rows[-1], flush=True)
    emit(markdown_table("Hadamard + quantize kernel, bf16 input, GB/s (read + write)",
                        ["shape", "variant", "launch", "GB/s", "of copy", "us"], rows),
         args.markdown)


def _of_copy(t: dict) -> str:
    """The bandwidth of quantizations as a fraction of their inputs' copies' (`layer_table`)."""
    return f"{t['bytes'] / t['us'] / (t['copy bytes'] / t['copy us']):.0%}"


def layer_table(args) -> None:
    """Every quantization of one decoder layer's step: its time, against a copy of its input."""
    preset = args.layer if "," not in args.layer else dict(
        zip(("forward", "grad_input", "grad_weight"), args.layer.split(","), strict=False))
    calls = layer_quantizations(parse_hadamard(preset), args.tokens)
    rows, totals = [], {}  # totals: the layer and each kind of operand -> sums over its calls
    layer = "all, one layer"
    measured = {}  # (shape, view, dim, block) -> (copy us, {launch: us}): alike operands once
    for operand, shape, view, dim, block in calls:
        t = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        x = t.t() if view == "transposed" else t
        nbytes = quantize_call(x, dim, "fp8_e4m3", "row", block, {})[0]
        copy_bytes = 4 * t.numel()  # a bf16 copy reads and writes 2 bytes a value
        key = (shape, view, dim, block)
        if key not in measured:
            times = {_label(config): timed(*quantize_call(x, dim, "fp8_e4m3", "row", block,
                                                          config))[1]
                     for config in configs_of(x, dim, block, args.sweep)}
            measured[key] = (timed(1, lambda: t.clone())[1], times)
            if args.sweep:
                print(key, {k: round(v, 1) for k, v in times.items()}, flush=True)
        copy_us, times = measured[key]
        best = min(times, key=times.get)
        call = {"us": times["default"], "copy us": copy_us, "fastest us": times[best],
                "bytes": nbytes, "copy bytes": copy_bytes}
        for group in (f"all {operand.split(':')[0]}", layer):  # X, W or dY
            sums = totals.setdefault(group, dict.fromkeys(call, 0.0))
            for name, value in call.items():
                sums[name] += value
        rows.append((operand, "x".join(map(str, x.shape)), view, str(dim), str(block),
                     f"{call['us']:.0f}", f"{copy_us:.0f}", _of_copy(call),
                     f"{best} ({times[best]:.0f})"))
        print(rows[-1], flush=True)
    for group in sorted(totals.keys() - {layer}) + [layer]:
        sums = totals[group]
        rows.append((group, "-", "-", "-", "-", f"{sums['us']:.0f}", f"{sums['copy us']:.0f}",
                     _of_copy(sums), f"{sums['fastest us']:.0f}"))
    emit(markdown_table(
        f"The quantizations of one Llama-3-8B decoder layer's training step, hadamard "
        f"{args.layer!r}, {args.tokens} tokens, bf16 -> FP8 row scales: us a call (CUDA graph), "
        f"against a copy (clone) of its input",
        ["operand", "view shape", "view", "dim", "block", "us", "copy us", "of copy GB/s",
         "fastest launch (us)"], rows), args.markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations")
    parser.add_argument("--only", default="",
                        help="only the variants whose name contains this text (e.g. 'dim 0')")
    parser.add_argument("--layer", help="a hadamard preset (halo2) or 'forward,grad_input,"
                        "grad_weight' (inner,outer,inner): a decoder layer's quantizations")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    layer_table(args) if args.layer else kernel_table(args)


if __name__ == "__main__":
    main()
