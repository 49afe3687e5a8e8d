"""shared_operands.py: one derived value per tensor (per base and description for tagged views),
key and version, released with the tensor."""

import gc
import weakref

import torch

from halo_compile.kernels.settings import LinearSettings
from halo_compile.kernels.shared_operands import cached, shared, shared_view


def test_derived_once_per_tensor_key_and_version():
    t = torch.randn(4, 3)
    calls = []

    def derive(x):
        calls.append(1)
        return x.sum()

    value = shared(t, "sum", derive)
    assert shared(t, "sum", derive) is value and cached(t, "sum") is value and len(calls) == 1
    assert cached(t, "other") is None and cached(torch.randn(4, 3), "sum") is None
    t.add_(1)  # an in-place write: the entry is stale
    assert cached(t, "sum") is None
    assert shared(t, "sum", derive) is not value and len(calls) == 2


def test_views_alike_of_one_tensor_share_entries():
    t = torch.randn(4, 3)
    first, second = (shared_view(t, "transposed", lambda x: x.t()) for _ in range(2))
    assert first is not second
    value = shared(first, "sum", lambda x: x.sum())
    assert shared(second, "sum", lambda x: 1 / 0) is value
    assert cached(shared_view(t, "other", lambda x: x.t()), "sum") is None
    assert cached(t, "sum") is None  # the base's own entries are apart


def test_entries_do_not_keep_their_tensor_alive():
    t = torch.randn(4, 3)
    view = shared_view(t, "transposed", lambda x: x.t())
    shared(view, "sum", lambda x: x.sum())
    alive = weakref.ref(t)
    del t, view
    gc.collect()
    assert alive() is None


def test_eager_backward_releases_the_activation_and_grad_output():
    """The backward makes views of dY and X whose entries live on them: they must not outlive
    the step."""
    w = torch.randn(64, 128, requires_grad=True)
    x = torch.randn(32, 128, requires_grad=True)
    settings = LinearSettings("fp8_e4m3", "row", "inner", "outer", "none", 256, "nearest", True,
                              "l", False)
    y = torch.ops.halo.quantized_linear(x, w, None, settings.encoded)
    grad = torch.randn_like(y)
    y.backward(grad)
    alive = [weakref.ref(t) for t in (x, y, grad)]
    del x, y, grad
    gc.collect()
    assert [ref() for ref in alive] == [None] * 3
