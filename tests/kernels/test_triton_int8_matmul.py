"""The INT8 GEMM with its scale epilogue against the plain-torch reference (exact integer
product, then the scales). On the CPU the kernel runs through the Triton interpreter."""

import pytest
import torch

from halo_compile.kernels.quantize import quantize
from halo_compile.kernels.triton_int8_matmul import (
    int8_scaled_mm,
    int8_scaled_mm_reference,
    int8_scaled_mm_triton,
)

# (M, K, N): tile edges crossed in every dimension (interpreter tiles 16 x 32 x 32), M = 1.
SHAPES = [(1, 64, 8), (37, 100, 45), (64, 32, 32), (130, 257, 70)]


def _operands(m, k, n, granularity, seed, device="cpu"):
    """Quantized operands of fresh float64 inputs; A with a few channels 100x larger."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g, dtype=torch.float64)
    a[:, torch.randperm(k, generator=g)[: max(1, k // 32)]] *= 100
    b = torch.randn(n, k, generator=g, dtype=torch.float64)
    qa, sa = quantize(a.float(), "int8", granularity)
    qb, sb = quantize(b.float(), "int8", granularity)
    return [t.to(device) for t in (qa, sa, qb, sb)], a, b


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("seed", [0, 1])
def test_interpreted_kernel_equals_reference(shape, granularity, out_dtype, seed):
    (qa, sa, qb, sb), _, _ = _operands(*shape, granularity, seed)
    out = int8_scaled_mm_triton(qa, sa, qb, sb, out_dtype)
    ref = int8_scaled_mm_reference(qa, sa, qb, sb, out_dtype)
    assert out.dtype == out_dtype and out.shape == ref.shape
    # Exact integer accumulation and the same float32 operations: bit for bit.
    assert torch.equal(out, ref)


def test_64_bit_offsets_give_the_same_result():
    """The 64-bit offset path (tensors of 2^31 elements or more) on a small input."""
    (qa, sa, qb, sb), _, _ = _operands(37, 100, 45, "row", 7)
    out = int8_scaled_mm_triton(qa, sa, qb, sb, torch.float32, int64=True)
    assert torch.equal(out, int8_scaled_mm_reference(qa, sa, qb, sb, torch.float32))


def test_reference_matches_float64_product():
    """The quantized product is close to the float64 product of the unquantized inputs (8 bits,
    row scales made coarse by A's outlier channels: 2.5% measured); a wrong scale or transpose
    would be off by O(1)."""
    (qa, sa, qb, sb), a, b = _operands(96, 256, 48, "row", 3)
    out = int8_scaled_mm_reference(qa, sa, qb, sb).double()
    exact = a @ b.t()
    assert ((out - exact).norm() / exact.norm()).item() < 0.04


def test_accumulation_is_exact_past_float32():
    """K * 127 * 127 beyond 2^24: an int32 accumulator stays exact where float32 would not."""
    k = 2048
    qa = torch.full((16, k), 127, dtype=torch.int8)
    qb = torch.full((16, k), 127, dtype=torch.int8)
    qa[:, 0] = 1  # an odd sum: float32 summation would lose the last bit
    one = torch.ones(1, 1)
    out = int8_scaled_mm_triton(qa, one, qb, one, torch.float32)
    expected = float(127 * 127 * (k - 1) + 127)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full((16, 16), expected).float())


def test_op_runs_reference_off_cuda_and_checks_arguments():
    (qa, sa, qb, sb), _, _ = _operands(20, 64, 12, "row", 4)
    out = torch.ops.halo.int8_scaled_mm(qa, sa, qb, sb, torch.bfloat16)
    assert torch.equal(out, int8_scaled_mm_reference(qa, sa, qb, sb, torch.bfloat16))
    with pytest.raises(ValueError, match="int8 operands"):
        int8_scaled_mm(qa.float(), sa, qb, sb, torch.float32)
    with pytest.raises(RuntimeError, match="sb must be float32"):
        int8_scaled_mm(qa, sa, qb, sb[:5], torch.float32)


def test_opcheck():
    (qa, sa, qb, sb), _, _ = _operands(24, 64, 16, "row", 5)
    torch.library.opcheck(torch.ops.halo.int8_scaled_mm, (qa, sa, qb, sb, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(8191, 4096, 4095), (17, 33, 9), (1, 64, 16), (512, 1000, 384)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernel_equals_int_mm(shape, out_dtype):
    """On the GPU: bit for bit what torch._int_mm followed by the scaling gives (the reference's
    int64 matmul has no CUDA kernel)."""
    (qa, sa, qb, sb), _, _ = _operands(*shape, "row", 6, device="cuda")
    out = torch.ops.halo.int8_scaled_mm(qa, sa, qb, sb, out_dtype)

    def pad(t, rows=None):  # to what _int_mm takes: columns and rows multiples of 8, or `rows`
        # more rows (A needs more than 16)
        rows = -t.shape[0] % 8 if rows is None else rows
        return torch.nn.functional.pad(t, (0, -t.shape[1] % 8, 0, rows))

    qa_p = pad(qa) if qa.shape[0] > 16 else pad(qa, 32 - qa.shape[0])
    acc = torch._int_mm(qa_p, pad(qb).t())[: qa.shape[0], : qb.shape[0]]
    assert torch.equal(out, (acc.float() * sa * sb.t()).to(out_dtype))
