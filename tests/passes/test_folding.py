"""The fold functions the rotation passes put in the graph (passes/folding.py)."""

import pytest
import torch

from halo_compile.passes.folding import _MULTIPLIER, _PRIME, random_signs, rotate, unrotate


def _signs_with_python_ints(width, seed):
    """The same hash in Python's unbounded integers: equal to the tensor result only if no
    int32 intermediate overflowed."""
    out = []
    for position in range(width):
        x = (position + (seed * 7919 + 1) % _PRIME) % _PRIME
        for _ in range(3):
            x = (x * _MULTIPLIER) % _PRIME
            x = (x * x + 12345) % _PRIME
        out.append(1.0 - 2.0 * ((x >> 7) & 1))
    return torch.tensor(out)


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_random_signs_never_overflow_int32(seed):
    # Inductor's Triton code may compute integer index arithmetic in int32; the hash must not
    # depend on the width its intermediates are computed in.
    width = 40000  # past the prime, where positions wrap
    assert torch.equal(random_signs(width, seed, "cpu"), _signs_with_python_ints(width, seed))


def test_random_signs_look_random():
    a, b = random_signs(4096, 0, "cpu"), random_signs(4096, 1, "cpu")
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 0.06  # balanced
    assert abs((a[1:] * a[:-1]).mean().item()) < 0.06  # neighbours uncorrelated
    assert abs((a * b).mean().item()) < 0.06  # seeds independent


def test_random_signs_compiled_equal_eager():
    compiled = torch.compile(lambda t: t * random_signs(t.shape[-1], 3, t.device), fullgraph=True)
    t = torch.randn(4, 4096)
    assert torch.equal(compiled(t), t * random_signs(4096, 3, "cpu"))


@pytest.mark.parametrize("seed", [None, 7])
def test_unrotate_undoes_rotate(seed):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 512, generator=g, dtype=torch.float64)
    t[:, :4] *= 100  # outlier channels
    back = unrotate(rotate(t, seed, 256), seed, 256)
    assert ((back - t).norm() / t.norm()).item() < 1e-12
