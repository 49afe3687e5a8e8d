"""A cache of tensors derived from weights (rotated, quantized), kept per weight version.

A frozen weight (a PEFT/LoRA base layer, an inference model) is the same tensor at every step, and
a trained one is the same tensor for every micro-batch of an optimizer step (gradient
accumulation; option `cache_weights`), so their rotated and quantized forms need not be
recomputed at every call. `WeightCache.get` memoizes any derivation of a weight under a tag;
`WeightCache.quantized` is the one the quantized matmuls use: `weight` (or its transpose) in the
operand dtype, rotated by a block Hadamard along its last dimension, quantized per row or per
tensor -- what `halo::scaled_matmul` computes for its right operand (`quantize_weight`: on CUDA
by the same Triton kernel, elsewhere `quantize_weight_reference`).

A derivation may also read other frozen tensors ("fold inputs": under `rotate="fused"` a weight is
first folded with the RMSNorm scale it reads and rotated, see passes/folding.py): `FOLDS` holds
such fold functions under a key, and an entry then depends on every tensor it read.

An entry is keyed by the tensor object given (held by weak reference: it goes when the weight
goes) and the tag, and is valid while the version counters of the weight and of each fold input
(`_version`, bumped by every in-place write that autograd sees: a for-loop or foreach optimizer
step, `copy_` under no_grad, `load_state_dict`) and their storage are unchanged. Two kinds of
write bypass the version counter. The fused optimizers (`AdamW(fused=True)`, ...) do: for
trained weights (option `cache_weights`) a hook on every torch.optim optimizer's step
(`watch_optimizer_steps`) drops the entries of the parameters the step may have updated. Writes
through `.data` (peft's `merge`, for one) do: the quantize pass calls `forget` on each frozen
weight when it compiles a graph (merging changes the module, so Dynamo recompiles); after editing
`.data` yourself, call `halo_compile.forget_cached_weights(model)`.

The cached tensors are shared between calls and must never be written. An op returns them only
where Inductor is kept from reusing its output buffers for later results
(`halo::cached_quantized_weight`, through the backend's lowering).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Optional

import torch

from .constants import MAX_BLOCK
from .quantize import check_finite
from .scaled_matmul import fused_block, quantized_operand
from .settings import MatmulSettings
from .triton_hadamard_quantize import hadamard_quantize_triton


def quantize_weight_reference(weight: torch.Tensor, fmt: str, granularity: str, block: int,
                              transpose: bool = False, dtype: Optional[torch.dtype] = None,
                              check: bool = True, where: str = "weight"):
    """The plain-torch derivation the cache stores: `op(weight)` (its transpose if `transpose`)
    cast to `dtype` (the other operand's; default: the weight's), then scaled_matmul's right
    operand: rotated along its last dimension in blocks of `block` (0: not rotated) and quantized
    to `fmt` with `granularity` scales. Returns (values, float32 scales); for fmt "none",
    (rotated float tensor, None). Raises NonFiniteInputError on inf/NaN when `check`."""
    b = weight.t() if transpose else weight
    return quantized_operand(b.to(dtype or weight.dtype), fmt, granularity, block, "nearest",
                             check, f"{where} (cached weight)")


def quantize_weight(weight: torch.Tensor, fmt: str, granularity: str, block: int,
                    transpose: bool = False, dtype: Optional[torch.dtype] = None,
                    check: bool = True, where: str = "weight"):
    """`quantize_weight_reference`'s result as the uncached CUDA path computes it: on CUDA, where
    the fused kernel takes the operand, one launch of it (values within one quantum of the
    reference's, and no host sync: the inf/NaN check is deferred, as every CUDA check is);
    elsewhere the reference."""
    b = (weight.t() if transpose else weight).to(dtype or weight.dtype)
    where = f"{where} (cached weight)"
    # (fused_block: the kernel takes this format and dtype; rotation "none", `block` given)
    kernel = fused_block(b, b, MatmulSettings(fmt)) is not None
    if not (b.is_cuda and kernel and block <= MAX_BLOCK):
        q, scale = quantized_operand(b, fmt, granularity, block, "nearest", check, where)
        # Row-major, as the kernel writes it and `halo::cached_quantized_weight`'s fake says:
        # an unrotated transpose would keep the transposed view's strides.
        return q.contiguous(), scale
    q, scale = hadamard_quantize_triton(b, fmt, granularity, block)
    if check:
        check_finite(scale, where)
    return q, scale


class FoldRegistry:
    """Fold functions `fold(weight, *fold_inputs) -> weight'`, under string keys that custom ops
    can take as arguments ("" is no fold). Registered at compile time by the quantize pass."""

    def __init__(self):
        self._folds: dict[str, Callable[..., torch.Tensor]] = {}

    def register(self, fold: Callable[..., torch.Tensor]) -> str:
        key = f"fold{len(self._folds)}"
        self._folds[key] = fold
        return key

    def apply(self, key: str, weight: torch.Tensor, inputs) -> torch.Tensor:
        return self._folds[key](weight, *inputs) if key else weight


FOLDS = FoldRegistry()
"""The fold functions the frozen-weight ops refer to by key."""


def _state(t: torch.Tensor) -> tuple:
    return (t._version, t.data_ptr())


@dataclass
class _Entry:
    weight: weakref.ref
    state: tuple  # (version, data_ptr) of the weight, then of each other tensor it depends on
    others: tuple  # weak references to those other tensors
    value: Any

    def valid_for(self, weight: torch.Tensor, others: tuple) -> bool:
        return (self.weight() is weight and len(others) == len(self.others)
                and all(ref() is t for ref, t in zip(self.others, others, strict=False))
                and self.state == tuple(_state(t) for t in (weight, *others)))


class WeightCache:
    """Derived tensors per (weight, version, tag). `computations` counts the derivations run
    (cache misses), `hits` the calls served from the cache: tests assert on them."""

    def __init__(self):
        self._entries: dict[tuple[int, Hashable], _Entry] = {}
        self.computations = 0
        self.hits = 0

    def get(self, weight: torch.Tensor, tag: Hashable, compute: Callable[[torch.Tensor], Any],
            others: tuple = ()):
        """`compute(weight)`, computed once per version of `weight` (and of each tensor in
        `others` that it also reads) for each `tag`. The tag must name everything else that the
        result depends on."""
        if any(t.is_inference() for t in (weight, *others)):
            self.computations += 1  # no version counter to tell a change: never cache
            return compute(weight)
        key = (id(weight), tag)
        entry = self._entries.get(key)
        if entry is not None and entry.valid_for(weight, others):
            self.hits += 1
            return entry.value
        value = compute(weight)
        self.computations += 1
        ref = weakref.ref(weight, lambda ref, key=key: self._drop(key, ref))
        self._entries[key] = _Entry(ref, tuple(_state(t) for t in (weight, *others)),
                                    tuple(weakref.ref(t) for t in others), value)
        return value

    def quantized(self, weight: torch.Tensor, fmt: str, granularity: str, block: int,
                  transpose: bool = False, dtype: Optional[torch.dtype] = None,
                  check: bool = True, where: str = "weight", fold: str = "",
                  fold_inputs: tuple = ()):
        """`quantize_weight(FOLDS.apply(fold, weight, fold_inputs), ...)`, cached. The
        layout is part of the tag, so a view of the weight never gets the weight's entry."""
        dtype = dtype or weight.dtype
        tag = ("quantized", fmt, granularity, block, transpose, dtype, fold,
               tuple(weight.shape), weight.stride(), weight.storage_offset())
        return self.get(weight, tag, lambda w: quantize_weight(
            FOLDS.apply(fold, w, fold_inputs), fmt, granularity, block, transpose, dtype, check,
            where), others=tuple(fold_inputs))

    def forget(self, weights: Optional[Iterable[torch.Tensor]] = None) -> None:
        """Drop the entries of `weights` (all entries when None): for writes the version counter
        does not see."""
        if weights is None:
            self._entries.clear()
            return
        ids = {id(w) for w in weights}
        for key in [key for key in self._entries if key[0] in ids]:
            del self._entries[key]

    def nbytes(self) -> int:
        """Memory held by the cached tensors."""
        return sum(t.numel() * t.element_size() for entry in self._entries.values()
                   for t in _tensors(entry.value))

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key, ref) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.weight is ref:
            del self._entries[key]


def _tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


WEIGHT_CACHE = WeightCache()
"""The cache the cached-weight matmuls use (kernels/frozen_linear.py): frozen weights, and
trained ones under option `cache_weights`."""


def _forget_stepped_parameters(optimizer, args, kwargs) -> None:
    """After an optimizer step: drop the entries of the parameters it may have written (those
    with a gradient; a frozen weight in the optimizer's groups keeps its entry)."""
    WEIGHT_CACHE.forget(p for group in optimizer.param_groups for p in group["params"]
                        if p.grad is not None)


_STEP_HOOK = []


def watch_optimizer_steps() -> None:
    """Have every torch.optim optimizer's step invalidate the cached forms of the weights it
    updates: the fused optimizers write weights without bumping their version counters (torch
    2.11-2.13), so the version check alone would serve stale weights after their steps.
    Registered once, by the quantize pass, when it caches a trained weight."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(_forget_stepped_parameters))
