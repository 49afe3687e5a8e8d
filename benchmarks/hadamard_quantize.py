"""Bandwidth of the fused Hadamard + quantize Triton kernel against a copy (x.clone()).

    python benchmarks/hadamard_quantize.py [--markdown out.md] [--sweep] [--only TEXT]

GB/s counts the bytes read once and written once (input, 8-bit values, float32 scales); the copy
reads and writes the input; "us" is one call's time. Timed as CUDA graphs
(triton.testing.do_bench_cudagraph, median), so launch overhead is left out. Variants: the
layouts the three matmuls of a linear need (rows, a transposed view for grad-weight, rotation
along dim 0 for the "outer" grad-input, and the last two at once: the dual). --sweep also times
launch configurations (BLOCK_M, NT, num_warps, split) of each variant: the strided ones at both
shapes, rows at the larger; --only picks variants by name. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from _timing import emit, markdown_table
from halo_compile.kernels.triton_hadamard_quantize import (
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
    "strided": [dict(block_m=bm, split=sp) for bm, sp in itertools.product((16, 32, 64),
                                                                          (1, 2, 4, 8))],
    # dim 0: a program owns 256 tokens and loops over BLOCK_M features at a time, in one of
    # `split` ranges of the features (the default aims at ~4 programs per SM).
    # (BLOCK_M 16 measured half as fast on an H200, for dim 0 and the dual.)
    "dim0": [dict(block_m=bm, num_warps=w) for bm, w in itertools.product((32, 64), (4, 8))]
            + [dict(split=sp) for sp in (8, 32)] + [dict(num_stages=st) for st in (2, 4)],
}


def timed(nbytes: int, fn) -> "tuple[float, float]":
    """(GB/s, microseconds) of one call."""
    fn()
    ms = triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return nbytes / (ms * 1e-3) / 1e9, ms * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations")
    parser.add_argument("--only", default="",
                        help="only the variants whose name contains this text (e.g. 'dim 0')")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    rows = []
    for m, k in SHAPES:
        t = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        copy_bytes = 2 * t.numel() * t.element_size()
        copy, us = timed(copy_bytes, lambda: t.clone())
        rows.append((f"{m}x{k}", "copy (x.clone())", "-", f"{copy:.0f}", "100%", f"{us:.0f}"))
        print(rows[-1], flush=True)
        for name, (build, dim, fmt, gran, block) in VARIANTS.items():
            if args.only not in name:
                continue
            x = build(t)
            dual = dim == "dual"
            outputs = 2 if dual else 1
            scales = sum(x.shape) if dual else x.shape[0] if gran == "row" else 1
            nbytes = t.numel() * (t.element_size() + outputs) + scales * 4
            configs = [{}]
            layout = "dim0" if dim == 0 or dual else "strided" if x.stride(1) != 1 else "rows"
            if args.sweep and (layout != "rows" or (m, k) == SHAPES[-1]):  # rows: larger only
                configs += SWEEP[layout]
            for cfg in configs:
                if dual:
                    bw, us = timed(nbytes, lambda: hadamard_quantize_dual_triton(x, fmt, block,
                                                                                 **cfg))
                else:
                    bw, us = timed(nbytes, lambda: hadamard_quantize_triton(x, fmt, gran, block,
                                                                            dim, **cfg))
                label = ", ".join(f"{k}={v}" for k, v in cfg.items()) or "default"
                rows.append((f"{m}x{k}", name, label, f"{bw:.0f}", f"{bw / copy:.0%}",
                             f"{us:.0f}"))
                print(rows[-1], flush=True)
    emit(markdown_table("Hadamard + quantize kernel, bf16 input, GB/s (read + write)",
                        ["shape", "variant", "launch", "GB/s", "of copy", "us"], rows),
         args.markdown)


if __name__ == "__main__":
    main()
