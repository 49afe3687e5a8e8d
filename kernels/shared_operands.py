"""One operand object per activation, so that linears reading the same activation share its
quantization.

q/k/v (and gate/up) read one normed activation, and each linear's op would rotate and quantize
it again (and its transpose, for grad-weight). AOTAutograd's CSE cannot merge those kernel
calls: each writes into a fresh `empty` buffer, which CSE never merges. So the ops build their
operand views through `shared` (the same view object for every linear reading that activation)
and the traced quantization goes through `shared` too (inductor_decompositions.py), keyed by
that object: the second linear gets the first one's FP8 values and scales.

Entries live as long as the activation object (weak keys) and are dropped when its version
counter shows an in-place write.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_DERIVED: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def shared(t: torch.Tensor, key: Hashable, derive: Callable[[torch.Tensor], object]):
    """`derive(t)`, computed once per tensor object, `key` and version of `t`."""
    entries = _DERIVED.setdefault(t, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == t._version:
        return hit[1]
    value = derive(t)
    entries[key] = (t._version, value)
    return value
