"""The INT8 GEMM with the scales in its epilogue (halo's Triton kernel) against torch._int_mm
followed by the scaling (compiled: Inductor fuses the scaling into one pointwise kernel) and a
bf16 matmul, at Llama-3-8B shapes (tokens 8192), side by side in one process.

    python benchmarks/int8_matmul.py [--markdown out.md]

Median ms (triton.testing.do_bench) and TFLOP/s of 2 * M * N * K. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch
import triton
from _timing import emit, markdown_table

from halo_compile.kernels.quantize import quantize
from halo_compile.kernels.triton_int8_matmul import int8_scaled_mm_triton

SHAPES = [(8192, 4096, 14336), (8192, 14336, 4096), (8192, 4096, 4096)]  # M, K, N


@torch.compile
def int_mm_then_scale(qa, sa, qb, sb):
    return (torch._int_mm(qa, qb.t()).float() * sa * sb.t()).to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    rows = []
    for m, k, n in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        qa, sa = quantize(a.float(), "int8", "row")
        qb, sb = quantize(b.float(), "int8", "row")
        contenders = {
            "bf16 matmul": lambda: a @ b.t(),
            "torch._int_mm + scaling (Inductor)": lambda: int_mm_then_scale(qa, sa, qb, sb),
            "halo Triton INT8, scales in epilogue": lambda: int8_scaled_mm_triton(
                qa, sa, qb, sb, torch.bfloat16),
        }
        same = torch.equal(contenders["halo Triton INT8, scales in epilogue"](),
                           contenders["torch._int_mm + scaling (Inductor)"]())
        bf16_ms = None
        for name, fn in contenders.items():
            fn()
            ms = triton.testing.do_bench(fn, return_mode="median")
            bf16_ms = bf16_ms or ms
            rows.append((f"{m}x{k}x{n}", name, f"{ms:.3f}", f"{2 * m * n * k / ms / 1e9:.0f}",
                         f"{bf16_ms / ms:.2f}x",
                         "-" if name == "bf16 matmul" else "yes" if same else "NO"))
            print(rows[-1], flush=True)
    emit(markdown_table("INT8 GEMM with scale epilogue (M x K x N, bf16 output)",
                        ["shape", "contender", "ms", "TFLOP/s", "x bf16",
                         "INT8 results bitwise equal"], rows), args.markdown)


if __name__ == "__main__":
    main()
