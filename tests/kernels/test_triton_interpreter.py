"""Kernels on CPU tensors through the Triton interpreter, without TRITON_INTERPRET."""

import torch
import triton
import triton.language as tl

from halo_compile.kernels.triton_interpreter import interpreted
from halo_compile.kernels.triton_quantize_helpers import _random_bits


def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * factor, mask=i < n)


def test_interpreted_kernel_runs_on_cpu_tensors_and_is_built_once():
    x = torch.randn(37)
    y = torch.empty_like(x)
    interpreted(_scale_kernel)[(3,)](x, y, 37, 3.0, BLOCK=16)
    assert torch.equal(y, x * 3.0)
    assert interpreted(_scale_kernel) is interpreted(_scale_kernel)


@triton.jit
def _square(v):
    return v * v


@triton.jit
def _square_plus(v, c: tl.constexpr):
    return _square(v) + c  # a helper calling a helper


def _helper_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, _square_plus(tl.load(x_ptr + i, mask=i < n), 1.0), mask=i < n)


def test_interpreted_kernel_calls_its_modules_jit_helpers():
    x = torch.randn(21)
    y = torch.empty_like(x)
    interpreted(_helper_kernel)[(2,)](x, y, 21, BLOCK=16)
    assert torch.equal(y, x * x + 1.0)
    # The module's own names still refer to the compiled helpers (GPU launches use those).
    assert isinstance(_square, triton.runtime.jit.JITFunction)


def _hash_kernel(seed_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bits = _random_bits(seed_ptr, 0, i)  # a helper of another module, calling one of its own
    tl.store(y_ptr + i, bits.to(tl.int32, bitcast=True), mask=i < n)


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = x * 0x7FEB352D & 0xFFFFFFFF
    x ^= x >> 15
    x = x * 0x846CA68B & 0xFFFFFFFF
    return x ^ x >> 16


def test_interpreted_kernel_calls_helpers_of_other_modules():
    seed = torch.tensor([12345, 0], dtype=torch.int64)
    y = torch.empty(20, dtype=torch.int32)
    interpreted(_hash_kernel)[(2,)](seed, y, 20, BLOCK=16)
    key = _lowbias32(12345)
    expected = [_lowbias32((i + key) & 0xFFFFFFFF) for i in range(20)]
    assert [v & 0xFFFFFFFF for v in y.tolist()] == expected
