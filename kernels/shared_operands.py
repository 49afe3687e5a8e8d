"""One quantization per activation, so that linears reading the same activation share it.

q/k/v (and gate/up) read one normed activation, and each linear's op would rotate and quantize
it again (and its transpose, for grad-weight). AOTAutograd's CSE cannot merge those kernel
calls: each writes into a fresh `empty` buffer, which CSE never merges. So the traced
quantization goes through `shared` (inductor_decompositions.py), which keeps its result on the
activation: the second linear gets the first one's FP8 values and scales.

The ops pass each linear its own view of the activation ([tokens, features], its transpose),
made by `shared_view`, which tags the view with its base and a description: `shared` on such a
view keeps the entry on the base under (description, key), so views alike of one activation
share their entries.

Entries live on the tensor itself (an attribute) and go with it; they hold results that do not
refer to it (a view does, through its C++ base, which would keep it alive for ever: PyTorch
preserves a tensor's Python object while its C++ side is referenced). They are ignored once the
tensor's version counter shows an in-place write.

Under the key DY_TRANSPOSE the backward's dY holds True when grad-input quantizes dY rotated
along the tokens and grad-weight dYᵀ rotated along them by the same block: one kernel then
computes both, and leaves dYᵀ's result where grad-weight's `shared` finds it
(inductor_decompositions.py).
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable

import torch

_ENTRIES = "_halo_shared"  # attribute of the tensor: {key: (version, value)}
_VIEW_OF = "_halo_view_of"  # attribute of a view: (weak reference to its base, description)

DY_TRANSPOSE = "grad-weight quantizes dY's transpose"


def _owner(t: torch.Tensor, key: Hashable):
    """The tensor whose entries hold `key` of `t`, and the key there."""
    tag = t.__dict__.get(_VIEW_OF)
    base = tag[0]() if tag is not None else None
    return (t, key) if base is None else _owner(base, (tag[1], key))


def _entries(t: torch.Tensor, key: Hashable):
    """(the entries that hold `key` of `t`, the key there)."""
    owner, key = _owner(t, key)
    return owner.__dict__.setdefault(_ENTRIES, {}), key


def cached(t: torch.Tensor, key: Hashable):
    """What `shared(t, key, ...)` holds for `t` at its current version, or None."""
    entries, key = _entries(t, key)
    hit = entries.get(key)
    return hit[1] if hit is not None and hit[0] == t._version else None


def shared(t: torch.Tensor, key: Hashable, derive: Callable[[torch.Tensor], object]):
    """`derive(t)`, computed once per tensor (per base and description, for a `shared_view`),
    `key` and version. The value must be neither None nor a view of `t` (see the module's
    doc)."""
    value = cached(t, key)
    if value is None:
        value = derive(t)
        entries, key = _entries(t, key)
        entries[key] = (t._version, value)
    return value


def shared_view(t: torch.Tensor, description: Hashable,
                make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`make(t)` (a view of `t`, or a copy), tagged so that `shared` keeps its entries on `t`
    under `description`: the same description must make the same tensor."""
    view = make(t)
    view.__dict__[_VIEW_OF] = (weakref.ref(t), description)
    return view
