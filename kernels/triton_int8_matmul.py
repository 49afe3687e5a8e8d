"""INT8 GEMM with the dequantization in its epilogue, one Triton kernel (the INT8 path for
Ampere and Ada, where INT8 tensor cores run at twice bf16).

`int8_scaled_mm(qa, sa, qb, sb, out_dtype)` computes

    ((qa @ qbᵀ in exact int32).float() * sa) * sbᵀ, rounded once to out_dtype

for int8 qa [M, K], qb [N, K] and float32 scales sa [M, 1] or [1, 1], sb [N, 1] or [1, 1] —
what `torch._int_mm` followed by the scaling computes, in the same float32 operation order, so
the two agree bit for bit. `torch._int_mm` writes the int32 accumulator to memory (4 bytes per
output) and a second kernel reads it back to scale and round it; here the accumulator is scaled
in registers and only the bf16/fp32 result is written. No padding either: `_int_mm` needs
every dimension a multiple of 8 and M > 16, the kernel masks its edges.

`halo::int8_scaled_mm` is a `torch.library.triton_op`: on CUDA Inductor emits the kernel into
its generated code; elsewhere the op runs `int8_scaled_mm_reference` (int64 matmul: exact).
`int8_scaled_mm_triton` runs the kernel directly, through the Triton interpreter on CPU tensors
(tests/kernels/test_triton_int8_matmul.py compares both with the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .triton_interpreter import interpreted


def _int8_scaled_mm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, out_ptr,
    M, N, K, stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    SA_VEC: tl.constexpr,  # a scale per row of A (else one)
    SB_VEC: tl.constexpr,  # a scale per row of B (else one)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INT64: tl.constexpr,  # element offsets need 64 bits
):
    # Grouped program order: GROUP_M row blocks share each column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m = (M + BLOCK_M - 1) // BLOCK_M
    blocks_n = (N + BLOCK_N - 1) // BLOCK_N
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * blocks_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    if INT64:
        row_off = rows.to(tl.int64)
        col_off = cols.to(tl.int64)
    else:
        row_off = rows
        col_off = cols
    a_at = a_ptr + row_off[:, None] * stride_am + ks[None, :] * stride_ak
    b_at = b_ptr + col_off[None, :] * stride_bn + ks[:, None] * stride_bk  # Bᵀ tile [K, N]
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(a_at, mask=(rows < M)[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_at, mask=k_ok[:, None] & (cols < N)[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_at += BLOCK_K * stride_ak
        b_at += BLOCK_K * stride_bk

    # Epilogue: the dequantization, in the order torch computes acc.float() * sa * sb.t().
    if SA_VEC:
        sa = tl.load(sa_ptr + rows, mask=rows < M, other=1.0)[:, None]
    else:
        sa = tl.load(sa_ptr)
    if SB_VEC:
        sb = tl.load(sb_ptr + cols, mask=cols < N, other=1.0)[None, :]
    else:
        sb = tl.load(sb_ptr)
    out = (acc.to(tl.float32) * sa) * sb
    tl.store(out_ptr + row_off[:, None] * stride_om + col_off[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


_kernel = triton.jit(_int8_scaled_mm_kernel)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). 128 x 128 x 64 int8 tiles take
# 16 KiB of shared memory per stage: four stages fit an RTX 4090 (99 KiB) as well as an A100.
GPU_CONFIG = (128, 128, 64, 8, 8, 4)
# The interpreter: small tiles, so that the tests' odd sizes cross tile edges in every dimension.
INTERPRETER_CONFIG = (16, 32, 32, 2, None, None)


def _check_args(qa, sa, qb, sb, out_dtype):
    if qa.dtype != torch.int8 or qb.dtype != torch.int8:
        raise ValueError(f"int8_scaled_mm takes int8 operands, got {qa.dtype} and {qb.dtype}")
    if qa.dim() != 2 or qb.dim() != 2:
        raise ValueError("int8_scaled_mm takes 2-D operands")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"int8_scaled_mm: unsupported output dtype {out_dtype}")
    torch._check(qa.shape[1] == qb.shape[1], lambda: "int8_scaled_mm: inner dimensions differ")
    for s, rows, name in ((sa, qa.shape[0], "sa"), (sb, qb.shape[0], "sb")):
        torch._check(s.dtype == torch.float32 and s.dim() == 2 and s.shape[1] == 1
                     and s.shape[0] in (1, rows),
                     lambda name=name: f"int8_scaled_mm: {name} must be float32 [rows, 1] or "
                                       "[1, 1]")


def _int8_scaled_mm_impl(kernel, qa, sa, qb, sb, out_dtype, config, interpret=False,
                         int64=None):
    _check_args(qa, sa, qb, sb, out_dtype)
    (M, K), N = qa.shape, qb.shape[0]
    # The interpreter (triton 3.x) truncates float32 -> bf16/fp16 instead of rounding to
    # nearest: there the kernel writes float32 and torch rounds.
    store_dtype = torch.float32 if interpret else out_dtype
    out = torch.empty((M, N), dtype=store_dtype, device=qa.device)
    block_m, block_n, block_k, group_m, num_warps, num_stages = config
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    launch = {} if num_warps is None else {"num_warps": num_warps, "num_stages": num_stages}
    kernel[grid](
        qa, qb, sa, sb, out, M, N, K, qa.stride(0), qa.stride(1), qb.stride(0), qb.stride(1),
        out.stride(0), out.stride(1), SA_VEC=sa.shape[0] != 1,
        SB_VEC=sb.shape[0] != 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group_m,
        INT64=max(qa.numel(), qb.numel(), M * N) >= 2**31 if int64 is None else int64, **launch,
    )
    return out.to(out_dtype)


def int8_scaled_mm_triton(qa, sa, qb, sb, out_dtype=torch.float32, *, int64=None):
    """Run the kernel directly: compiled on CUDA tensors, through the Triton interpreter on CPU
    tensors. int64: force 64-bit element offsets on or off (default: when a tensor has 2^31
    elements or more)."""
    if qa.device.type == "cuda":
        return _int8_scaled_mm_impl(_kernel, qa, sa, qb, sb, out_dtype, GPU_CONFIG, int64=int64)
    return _int8_scaled_mm_impl(interpreted(_int8_scaled_mm_kernel), qa, sa, qb, sb, out_dtype,
                                INTERPRETER_CONFIG, interpret=True, int64=int64)


def int8_scaled_mm_reference(qa, sa, qb, sb, out_dtype=torch.float32):
    """Plain torch: the exact integer product (int64), then the scales in float32."""
    _check_args(qa, sa, qb, sb, out_dtype)
    acc = qa.to(torch.int64) @ qb.to(torch.int64).t()
    return (acc.float() * sa * sb.t()).to(out_dtype)


@triton_op("halo::int8_scaled_mm", mutates_args=())
def int8_scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """qa [M, K] @ qb [N, K]ᵀ (int8, exact int32 accumulation), scaled by sa [M, 1] and
    sb [N, 1] (or [1, 1]) in float32, rounded to out_dtype. CUDA: the Triton kernel; other
    devices: the reference."""
    if qa.device.type != "cuda":
        return int8_scaled_mm_reference(qa, sa, qb, sb, out_dtype)
    return _int8_scaled_mm_impl(wrap_triton(_kernel), qa, sa, qb, sb, out_dtype, GPU_CONFIG)
