"""Kernels on CPU tensors through the Triton interpreter, without TRITON_INTERPRET."""

import torch
import triton
import triton.language as tl

from halo_compile.kernels.triton_interpreter import interpreted


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


def _randint_kernel(seed_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bits = tl.randint(tl.load(seed_ptr), i)
    tl.store(out_ptr + i, bits.to(tl.int32, bitcast=True))


def _random_bits(seed: int, n: int = 4096) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.int32)
    interpreted(_randint_kernel)[(n // 256,)](torch.tensor([seed]), out, BLOCK=256)
    return out


def test_interpreted_kernel_draws_philox_numbers():
    a, b = _random_bits(7), _random_bits(8)
    assert torch.equal(a, _random_bits(7))  # a function of (seed, offset)
    assert (a != b).float().mean() > 0.99
    assert a.unique().numel() > 4090
    # Uniform over 32 bits: each bit set about half the time (4096 draws: sd 0.008).
    for bit in (0, 11, 20, 31):
        share = ((a >> bit) & 1).float().mean().item()
        assert abs(share - 0.5) < 0.04, (bit, share)
    # Outside an interpreted launch, tl.randint is Triton's own again (GPU kernels use it).
    assert isinstance(tl.randint, triton.runtime.jit.JITFunction)
