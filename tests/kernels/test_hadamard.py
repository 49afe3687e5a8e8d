"""kernels/hadamard.py: the block Walsh-Hadamard transform against the explicit matrix in
float64."""

import math

import pytest
import torch

from halo_compile.kernels.hadamard import (
    MIN_BLOCK,
    block_hadamard,
    hadamard_block_size,
    hadamard_matrix,
    sylvester_signs,
)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _outlier_input(shape, seed, dim=-1):
    """Gaussian with 1% (at least one) of the slices along `dim` 100x larger: never zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    n = x.shape[dim]
    idx = torch.randperm(n, generator=g)[: max(1, round(0.01 * n))]
    scale = torch.ones(n, dtype=torch.float64)
    scale[idx] = 100.0
    view = [1] * x.dim()
    view[dim] = n
    return x * scale.reshape(view)


def _sylvester(block):
    """H[i, j] = (-1)^popcount(i & j) / sqrt(block): the Sylvester matrix, built independently."""
    i = torch.arange(block)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).double() / math.sqrt(block)


def _block_matrix(n, block):
    """kron(I_{n/block}, H_block) in float64."""
    return torch.kron(torch.eye(n // block, dtype=torch.float64), _sylvester(block))


@pytest.mark.parametrize("block", [1, 2, 16, 256])
def test_sylvester_signs_are_exact_in_every_float_dtype(block):
    want = (_sylvester(block) * math.sqrt(block)).round()
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        got = sylvester_signs(block, dtype)
        assert got.dtype == dtype and got.abs().eq(1).all() and torch.equal(got.double(), want)


@pytest.mark.parametrize("block", [16, 32, 64, 128, 256, 512, 1024])
def test_hadamard_matrix_is_sylvester_and_orthogonal(block):
    h = hadamard_matrix(block, dtype=torch.float64)
    torch.testing.assert_close(h, _sylvester(block), rtol=0, atol=1e-15)
    torch.testing.assert_close(h @ h.T, torch.eye(block, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "block,n",
    [(16, 16), (16, 48), (32, 96), (64, 64), (128, 384), (256, 512), (512, 1024), (1024, 1024),
     (1024, 2048)],
)
def test_block_hadamard_equals_kron_matrix_last_dim(block, n, seed):
    x = _outlier_input((7, n), seed)
    ref = x @ _block_matrix(n, block)
    out64 = block_hadamard(x, block, dim=-1)
    assert out64.dtype == torch.float64
    assert _rel(out64, ref) < 1e-13
    out32 = block_hadamard(x.float(), block, dim=-1)
    assert out32.dtype == torch.float32
    assert _rel(out32, ref) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block,n", [(16, 80), (64, 192), (256, 256), (1024, 1024)])
def test_block_hadamard_dim0(block, n, seed):
    x = _outlier_input((n, 5), seed, dim=0)
    ref = _block_matrix(n, block) @ x  # H is symmetric: rotating columns = left-multiplying
    out = block_hadamard(x.float(), block, dim=0)
    assert out.shape == x.shape
    assert _rel(out, ref) < 1e-6


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_block_hadamard_batched_any_dim(dim):
    shape = [32, 64, 48]
    x = _outlier_input(shape, seed=3, dim=dim)
    n = shape[dim]
    block = 16
    ref = torch.tensordot(x, _block_matrix(n, block), dims=([dim], [0])).movedim(-1, dim)
    out = block_hadamard(x.float(), block, dim=dim)
    assert out.shape == x.shape
    assert _rel(out, ref) < 1e-6


def test_block_hadamard_non_contiguous_input():
    x = _outlier_input((96, 64), seed=4, dim=0).T  # [64, 96], non-contiguous
    assert not x.is_contiguous()
    ref = x @ _block_matrix(96, 32)
    assert _rel(block_hadamard(x.float(), 32, dim=-1), ref) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [16, 128, 1024])
def test_block_hadamard_orthogonal(block, seed):
    x = _outlier_input((9, 2048), seed)
    y = block_hadamard(x, block)
    # Norm preserved, per row and per block.
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    torch.testing.assert_close(
        y.reshape(9, -1, block).norm(dim=-1), x.reshape(9, -1, block).norm(dim=-1),
        rtol=1e-13, atol=0,
    )
    # H is its own inverse.
    assert _rel(block_hadamard(y, block), x) < 1e-13
    x32 = x.float()
    assert _rel(block_hadamard(block_hadamard(x32, block), block), x) < 1e-6


@pytest.mark.parametrize("block", [16, 64, 256])
def test_block_hadamard_spreads_an_outlier(block):
    """The point of the rotation: a single spike becomes flat over its block."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2 * block, generator=g, dtype=torch.float64) * 1e-3
    x[:, 5] = 1000.0
    y = block_hadamard(x, block)
    first = y[:, :block]
    # All entries of the first block are 1000/sqrt(block) up to the small Gaussian part.
    expected = 1000.0 / math.sqrt(block)
    assert float((first.abs() - expected).abs().max()) < 0.01 * expected
    assert float(first.abs().max()) < x.abs().max() / math.sqrt(block) * 1.01
    # The second block does not see it.
    assert float(y[:, block:].abs().max()) < 0.1


def test_block_hadamard_low_precision_input_computes_in_float32():
    x = _outlier_input((8, 256), seed=5)
    xb = x.to(torch.bfloat16)
    y = block_hadamard(xb, 64)
    assert y.dtype == torch.float32
    assert _rel(y, xb.double() @ _block_matrix(256, 64)) < 1e-6


@pytest.mark.parametrize(
    "dim,max_block,expected",
    [
        (11008, 256, 256),  # 11008 = 2^8 * 43
        (11008, 0, 256),  # full: still limited by the power of two dividing the dim
        (11008, 1024, 256),
        (11008, 128, 128),
        (14336, 0, 2048),  # 14336 = 2^11 * 7
        (14336, 256, 256),
        (4096, 0, 4096),
        (4096, 256, 256),
        (4096, 16, 16),
        (17, 0, 0),  # odd
        (17, 256, 0),
        (24, 0, 0),  # 24 = 2^3 * 3: block 8 < MIN_BLOCK
        (48, 0, 16),
        (16, 0, 16),
        (8, 0, 0),
        (1, 0, 0),
        (0, 0, 0),
        (96, 32, 32),
        (96, 16, 16),
    ],
)
def test_hadamard_block_size(dim, max_block, expected):
    assert MIN_BLOCK == 16
    block = hadamard_block_size(dim, max_block)
    assert block == expected
    if block:
        assert dim % block == 0 and block & (block - 1) == 0 and block >= MIN_BLOCK
        assert max_block == 0 or block <= max_block


@pytest.mark.parametrize("dim", [16, 48, 96, 384, 1000, 11008, 14336, 4096, 4095, 6144])
@pytest.mark.parametrize("max_block", [0, 16, 64, 256, 2048])
def test_hadamard_block_size_is_largest_admissible(dim, max_block):
    block = hadamard_block_size(dim, max_block)
    admissible = [
        b for b in (1 << i for i in range(4, 16))
        if dim % b == 0 and (max_block == 0 or b <= max_block)
    ]
    assert block == (max(admissible) if admissible else 0)


@pytest.mark.parametrize("block", [0, -16, 3, 24, 100])
def test_bad_block_not_power_of_two(block):
    x = torch.randn(4, 96)
    with pytest.raises(ValueError, match="power of two"):
        block_hadamard(x, block)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(block)


def test_bad_block_does_not_divide():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard(x, 32)
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard(x, 16, dim=0)


def test_a_symbolic_token_count_padded_has_a_provable_block():
    """Under dynamic shapes the padded token count is provably a multiple of the block, so the
    along-token rotation keeps its block; an unpadded symbolic size is refused, never left
    unrotated."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from halo_compile.kernels.hadamard import pad_rows

    env = ShapeEnv()
    count = env.create_symintnode(env.create_symbol(300, ConstantSource("tokens")), hint=300)
    with FakeTensorMode(shape_env=env, allow_non_fake_inputs=True):
        padded = pad_rows(torch.empty((count, 64)), 256)
        assert hadamard_block_size(padded.shape[0], 256) == 256
        assert hadamard_block_size(padded.shape[0], 0) == 256
        with pytest.raises(ValueError, match="pad it"):
            hadamard_block_size(count, 256)
    assert pad_rows(torch.ones(300, 4), 256).shape == (512, 4)
    assert pad_rows(torch.ones(300, 4), 256)[300:].abs().sum() == 0
    plain = torch.ones(512, 4)
    assert pad_rows(plain, 256) is plain
