"""The FP8 GEMM alone: `torch._scaled_mm` at the three matmul shapes of one Llama-3-8B linear
(in 4096, out 14336, tokens 8192), with row-wise and tensor-wise scales, with and without
`use_fast_accum`, on operands quantized plainly and after a Hadamard rotation, and with 1x128
block scales on both operands (`torch.nn.functional.scaled_mm`, where this torch has it: one
scale per 128 values along K, which a quantize kernel computes in one pass), against the bf16
matmul, side by side in one process. It says which of these choices makes cuBLASLt's FP8 GEMM
slower or faster (the linear benchmark's profile: halo's GEMMs 0.74 ms, torchao's 0.63-0.65).

    python benchmarks/scaled_mm.py [--markdown out.md]

Median ms (CUDA graph timing) and the speed-up over the bf16 matmul of the same shape. Needs a
CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch
import triton
from _timing import emit, markdown_table

from halo_compile.kernels.hadamard import block_hadamard
from halo_compile.kernels.triton_hadamard_quantize import hadamard_quantize_triton

# (what, M, K, N): A [M, K] row-major times B [N, K] row-major, transposed (cuBLASLt's "TN").
SHAPES = [("forward", 8192, 4096, 14336), ("grad-input", 8192, 14336, 4096),
          ("grad-weight", 14336, 8192, 4096)]


def quantize_1x128(t: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """FP8 E4M3 values of t [rows, K] with one scale per 128 values of a row (plain torch: the
    benchmark times the GEMM only). The scales [rows, K / 128] are laid out rows-major
    (stride (1, rows)), as cuBLASLt's 1x128 block scaling reads them."""
    groups = t.float().reshape(t.shape[0], -1, 128)
    scale = groups.abs().amax(-1).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (groups / scale[..., None]).to(torch.float8_e4m3fn).reshape(t.shape)
    return q, scale.t().contiguous().t()


def dequantize_1x128(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().reshape(q.shape[0], -1, 128) * scale[..., None]).reshape(q.shape)


def block_scaled_mm(qa, sa, qb, sb):
    """A [M, K] @ B [N, K]ᵀ with 1x128 block scales on both: scaled_mm takes B's scales [N, K/128]
    as they are, though it is given Bᵀ."""
    from torch.nn.functional import ScalingType, scaled_mm

    return scaled_mm(qa, qb.t(), sa, ScalingType.BlockWise1x128, sb,
                     ScalingType.BlockWise1x128, output_dtype=torch.bfloat16)


def bench(fn) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="append the table as markdown to this file")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    rows = []
    for what, m, k, n in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        bf16_ms = bench(lambda: a @ b.t())
        rows.append((what, f"{m}x{k}x{n}", "bf16 matmul", "-", f"{bf16_ms:.3f}", "1.00x"))
        print(rows[-1], flush=True)
        for operands, block in (("plain", 0), ("Hadamard 256", 256)):
            qa, sa = hadamard_quantize_triton(a, "fp8_e4m3", "row", block)
            qb, sb = hadamard_quantize_triton(b, "fp8_e4m3", "row", block)
            scales = {"row": (sa, sb.t().contiguous()),
                      "tensor": (sa.amax().reshape(()), sb.amax().reshape(()))}
            for granularity, (scale_a, scale_b) in scales.items():
                for fast in (False, True):
                    ms = bench(lambda: torch._scaled_mm(
                        qa, qb.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                        use_fast_accum=fast))
                    rows.append((what, f"{m}x{k}x{n}", f"fp8 {granularity} scales, {operands}",
                                 "yes" if fast else "no", f"{ms:.3f}", f"{bf16_ms / ms:.2f}x"))
                    print(rows[-1], flush=True)
            rotated_a, rotated_b = (block_hadamard(t, block, dim=1) if block else t
                                    for t in (a, b))
            (qa, sa), (qb, sb) = quantize_1x128(rotated_a), quantize_1x128(rotated_b)
            # No use_fast_accum here: cuBLASLt refuses it with 1x128 block scales (torch 2.11).
            # The product is checked against the dequantized operands' (a wrong scale layout
            # would still run).
            try:
                out = block_scaled_mm(qa, sa, qb, sb).float()
                ref = dequantize_1x128(qa, sa) @ dequantize_1x128(qb, sb).t()
                err = float((out - ref).norm() / ref.norm())
                ms = bench(lambda: block_scaled_mm(qa, sa, qb, sb))
                result = (f"{ms:.3f} (rel err {err:.1e})", f"{bf16_ms / ms:.2f}x")
            except (ImportError, RuntimeError, ValueError) as e:  # not in this torch/cuBLASLt
                result = (f"unsupported: {str(e).splitlines()[0][:80]}", "-")
            rows.append((what, f"{m}x{k}x{n}", f"fp8 1x128 block scales, {operands}", "no",
                         *result))
            print(rows[-1], flush=True)
    emit(markdown_table("torch._scaled_mm (FP8 E4M3, bf16 output) vs bf16 matmul",
                        ["matmul", "M x K x N", "GEMM", "use_fast_accum", "ms", "x bf16"], rows),
         args.markdown)


if __name__ == "__main__":
    main()
