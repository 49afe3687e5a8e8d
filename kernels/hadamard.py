"""Block Walsh-Hadamard transform: the plain-torch reference.

`H_b` is the normalised Sylvester Hadamard matrix of size `b` (a power of two): symmetric and
orthogonal, so it is its own inverse. A block transform applies `H_b` to each contiguous block of
`b` elements along one dimension, which is the same as multiplying by the block-diagonal matrix
`I ⊗ H_b`: still orthogonal, so `(X H)(W H)ᵀ = X Wᵀ` holds for any block size that divides the
dimension.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .constants import MIN_BLOCK  # smaller blocks spread an outlier over too few values

MAX_TOKEN_BLOCK = 256
"""The largest block along the tokens: the fused kernels' largest, for any token count."""


def hadamard_block_size(dim, max_block: int) -> int:
    """The block used to rotate a dimension of size `dim`: the largest power of two that divides
    `dim` and is at most `max_block` (0 means no upper limit, a "full" Hadamard where `dim` is a
    power of two). Returns 0 when no block of at least MIN_BLOCK fits, meaning: do not rotate.
    A symbolic `dim` (dynamic shapes) gets the largest block known to divide it for every value
    it can take (a token count padded by `pad_rows`), decided without a guard on its value."""
    if not isinstance(dim, int):
        block = max_block or 1 << 30
        while block >= MIN_BLOCK and not statically_known_true(dim % block == 0):
            block //= 2
        if block < MIN_BLOCK:  # never a rotation silently dropped for a symbolic size
            raise ValueError(f"no Hadamard block provably divides the symbolic size {dim}: "
                             "pad it to a multiple of the block first (pad_rows)")
        return block
    if dim <= 0:
        return 0
    largest_dividing = dim & -dim  # lowest set bit: the largest power of two dividing dim
    block = largest_dividing if max_block == 0 else min(largest_dividing, max_block)
    return block if block >= MIN_BLOCK else 0


def token_block(max_block: int) -> int:
    """The block of a rotation along the tokens ("outer" on the forward and grad-input, "inner"
    on grad-weight): the configured block, at most MAX_TOKEN_BLOCK. Its size does not depend on
    the token count, which is zero-padded to a multiple of it (`pad_rows`): every count, static
    or symbolic, is rotated the same way, and a graph never specializes on it."""
    return min(max_block or MAX_TOKEN_BLOCK, MAX_TOKEN_BLOCK)


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """`t` (2-D) with zero rows appended up to a multiple of `multiple` rows; `t` itself where
    its row count is known to be one (static shapes: always decided; symbolic ones: padded
    whenever the count is not a provable multiple). Zero rows change no product of the other
    rows, and their rotated values are sliced off after the un-rotation."""
    rows = t.shape[0]
    # Written as a multiple, so that a symbolic count's padded size is provably one
    # (hadamard_block_size decides its block without a guard).
    padded = (rows + multiple - 1) // multiple * multiple
    if statically_known_true(padded == rows):
        return t
    # (torch.cat, not F.pad: constant_pad_nd's kernel wants concrete sizes outside a trace)
    return torch.cat([t, t.new_zeros((padded - rows, *t.shape[1:]))])


def hadamard_matrix(block: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix H_block (H Hᵀ = I)."""
    return (sylvester_signs(block, torch.float64, device) / math.sqrt(block)).to(dtype)


def sylvester_signs(block: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The ±1 Sylvester matrix (H_block * sqrt(block), exact in every float dtype) from its
    closed form H[u, v] = (-1)^popcount(u & v): pointwise ops on an index grid, which a traced
    graph keeps as ops (Inductor compiles them into one small kernel) rather than a constant."""
    _check_power_of_two(block)
    index = torch.arange(block, device=device)
    bits = index[:, None] & index[None, :]
    parity = torch.zeros_like(bits)
    for shift in range(block.bit_length()):
        parity = parity ^ ((bits >> shift) & 1)
    return (1 - 2 * parity).to(dtype)


@functools.lru_cache(maxsize=64)
def hadamard_signs(block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`sylvester_signs`, built once per block, dtype and device for eager hot paths.
    Shared: never modify it in place."""
    return sylvester_signs(block, dtype, device)


def block_hadamard(x: torch.Tensor, block: int, dim: int = -1) -> torch.Tensor:
    """Apply H_block to every block of `block` elements along `dim` in O(n log block) operations.

    Computes in float32 (float64 stays float64) and returns that dtype: the result feeds a
    quantizer, which wants the rotated values before any rounding to the input's dtype."""
    _check_power_of_two(block)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    moved = x.to(compute_dtype).movedim(dim, -1)
    n = moved.shape[-1]
    if n % block:
        raise ValueError(f"block {block} does not divide dimension of size {n}")
    lead = moved.shape[:-1]
    y = moved.reshape(-1, n // block, block)
    half = 1
    while half < block:
        # Butterfly stage: pairs (i, i + half) inside each group of 2*half become (a + b, a - b).
        pairs = y.reshape(y.shape[0], n // block, block // (2 * half), 2, half)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(y.shape)
        half *= 2
    y = y * (1.0 / math.sqrt(block))
    return y.reshape(*lead, n).movedim(-1, dim)


def _check_power_of_two(block: int) -> None:
    if block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {block}")
