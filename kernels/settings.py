"""The settings each quantized-matmul op takes, one bundle per op family, validated once.

A custom op's schema can only hold tensors and primitive values, so every op takes its bundle
as one `str` argument, the bundle's canonical encoding: the JSON object of its fields in
declaration order (`settings.encoded`). The op parses it back with `Bundle.decode`, cached per
string (an `lru_cache` hit: a dictionary lookup, negligible beside the op's dispatch), so each
argument list is written once, here, and a misplaced or misspelt value is an error when the
bundle is built, not a silent swap.

    MatmulSettings   halo::scaled_matmul, halo::frozen_weight_matmul (and the weight cache's op)
    LinearSettings   halo::quantized_linear, halo::frozen_linear, halo::emulated_quantized_linear
    WeightSource     which tensor the cached-weight ops read as the right operand
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from .constants import GRANULARITIES, LINEAR_FORMATS, MATMUL_FORMATS, ROTATIONS, ROUNDINGS
from .hadamard import token_block

_Bundle = TypeVar("_Bundle", bound="_Encoded")


def _check_choice(bundle: str, field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{bundle}.{field} must be one of {allowed}, got {value!r}")


def _check_type(bundle: str, field: str, value: Any, kind: type) -> None:
    # bool is an int: a flag passed where a block size belongs is refused.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{bundle}.{field} must be a {kind.__name__}, got {value!r}")


class _Encoded:
    """The canonical string encoding shared by the bundles (frozen dataclasses)."""

    @functools.cached_property
    def encoded(self) -> str:
        """The bundle as an op argument: its fields as a JSON object, in declaration order.
        Cached on the instance (a frozen dataclass still has a __dict__)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps(values, separators=(",", ":"))

    @classmethod
    def decode(cls: type[_Bundle], text: str) -> _Bundle:
        """The bundle an op argument encodes (the same object for the same string)."""
        if not isinstance(text, str):
            raise ValueError(f"halo op settings ({cls.__name__}): expected the encoded string, "
                             f"got {text!r}")
        return _decode(cls, text)


@functools.lru_cache(maxsize=4096)
def _decode(cls: type[_Bundle], text: str) -> _Bundle:
    what = f"halo op settings ({cls.__name__})"
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}: not an encoded bundle: {text!r}") from error
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict) or sorted(values) != sorted(names):
        raise ValueError(f"{what}: expected the fields {names}, got {text!r}")
    return cls(**values)


@dataclass(frozen=True)
class MatmulSettings(_Encoded):
    """One quantized matmul `A Bᵀ` (kernels/scaled_matmul.py)."""

    format: str = "fp8_e4m3"  # MATMUL_FORMATS
    rotation: str = "none"  # ROTATIONS: "none", "inner" (along K) or "outer" (along A's rows)
    max_block: int = 0  # the Hadamard block limit; 0: none ("full")
    granularity: str = "row"  # GRANULARITIES: one scale per row, or per tensor
    rounding_a: str = "nearest"  # ROUNDINGS, of each operand's quantization
    rounding_b: str = "nearest"
    check_finite: bool = True  # raise NonFiniteInputError on an inf/NaN operand
    where: str = "scaled_matmul"  # how errors name the matmul
    fast_accum: bool = False  # the FP8 GEMM accumulates in the tensor cores' fast mode (CUDA)

    def __post_init__(self):
        name = type(self).__name__
        _check_choice(name, "format", self.format, MATMUL_FORMATS)
        _check_choice(name, "rotation", self.rotation, ROTATIONS)
        _check_type(name, "max_block", self.max_block, int)
        _check_choice(name, "granularity", self.granularity, GRANULARITIES)
        _check_choice(name, "rounding_a", self.rounding_a, ROUNDINGS)
        _check_choice(name, "rounding_b", self.rounding_b, ROUNDINGS)
        _check_type(name, "check_finite", self.check_finite, bool)
        _check_type(name, "where", self.where, str)
        _check_type(name, "fast_accum", self.fast_accum, bool)

    @functools.cached_property
    def unchecked(self) -> MatmulSettings:
        """The same matmul without the inf/NaN check (its operands were checked elsewhere)."""
        return dataclasses.replace(self, check_finite=False)


@dataclass(frozen=True)
class LinearSettings(_Encoded):
    """One linear layer `x Wᵀ + b` and its three matmuls (kernels/quantized_linear.py)."""

    format: str = "fp8_e4m3"  # LINEAR_FORMATS (the 4-bit ones: halo::emulated_quantized_linear)
    granularity: str = "row"
    forward_rotation: str = "none"
    grad_input_rotation: str = "none"
    grad_weight_rotation: str = "none"
    max_block: int = 0
    grad_rounding: str = "nearest"  # dY's rounding, in both gradient matmuls
    check_finite: bool = True
    name: str = "linear"  # the module's name, in errors
    fast_accum: bool = False  # the forward GEMM's; the gradients accumulate in float32
    cache_weight: bool = False  # the weight side from the weight cache (option cache_weights)

    def __post_init__(self):
        name = type(self).__name__
        _check_choice(name, "format", self.format, LINEAR_FORMATS)
        _check_choice(name, "granularity", self.granularity, GRANULARITIES)
        for rotation in ("forward_rotation", "grad_input_rotation", "grad_weight_rotation"):
            _check_choice(name, rotation, getattr(self, rotation), ROTATIONS)
        _check_type(name, "max_block", self.max_block, int)
        _check_choice(name, "grad_rounding", self.grad_rounding, ROUNDINGS)
        for flag in ("check_finite", "fast_accum", "cache_weight"):
            _check_type(name, flag, getattr(self, flag), bool)
        _check_type(name, "name", self.name, str)

    @functools.cached_property
    def forward(self) -> MatmulSettings:
        """Y = X Wᵀ."""
        return MatmulSettings(self.format, self.forward_rotation, self.max_block,
                              self.granularity, "nearest", "nearest", self.check_finite,
                              f"{self.name} forward", self.fast_accum)

    @functools.cached_property
    def grad_input(self) -> MatmulSettings:
        """dX = dY W: dY rounded as `grad_rounding` says, float32 accumulation."""
        return MatmulSettings(self.format, self.grad_input_rotation, self.max_block,
                              self.granularity, self.grad_rounding, "nearest", self.check_finite,
                              f"{self.name} grad-input")

    @functools.cached_property
    def grad_weight(self) -> MatmulSettings:
        """dW = dYᵀ X. "inner" rotates along the tokens, by the token block (kernels/hadamard.py)
        that an "outer" grad-input uses too."""
        inner = self.grad_weight_rotation == "inner"
        return MatmulSettings(self.format, self.grad_weight_rotation,
                              token_block(self.max_block) if inner else self.max_block,
                              self.granularity, self.grad_rounding, "nearest", self.check_finite,
                              f"{self.name} grad-weight")


@dataclass(frozen=True)
class WeightSource(_Encoded):
    """The right operand of a cached-weight matmul: `op(FOLDS.apply(fold, weight, fold_inputs))`,
    op the transpose when `transpose` (kernels/weight_cache.py). For a linear it is the layer's
    W [out, in]: `transpose` when the weight is stored [in, out] (GPT-2's Conv1D)."""

    fold: str = ""  # a key of weight_cache.FOLDS; "": the weight itself
    transpose: bool = False

    def __post_init__(self):
        _check_type(type(self).__name__, "fold", self.fold, str)
        _check_type(type(self).__name__, "transpose", self.transpose, bool)

    @functools.cached_property
    def transposed(self) -> WeightSource:
        """The same weight, the other way round (grad-input's Wᵀ from the forward's W)."""
        return dataclasses.replace(self, transpose=not self.transpose)
