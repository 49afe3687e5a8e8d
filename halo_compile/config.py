"""The backend's options: a typed, validated config, parsed from `torch.compile(options=...)`.

Every key and value is checked: a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from halo_compile.kernels.constants import GRANULARITIES, LINEAR_FORMATS, ROTATIONS, ROUNDINGS

FORMATS = LINEAR_FORMATS  # 4-bit ones (EMULATED_FORMATS): inference, emulated
NONFINITE_POLICIES = ("raise", "propagate")
COMPILERS = ("inductor", "aot_eager")
# Where rotations live. "online": weights untouched, operands rotated on the fly as `hadamard`
# says (HALO; `hadamard="none"` turns them off). "fused": QuaRot-style rotations folded into the
# weights (passes/fuse_norms.py, rotate_residual.py, fold_online_rotations.py; docs/rotation.md).
ROTATE_MODES = ("online", "fused")
# LoRA adapter matmuls (peft's lora_A / lora_B): small, trained, and cheap in high precision.
ADAPTER_POLICIES = ("high_precision", "quantize")
# What happens when a linear halo was asked to quantize runs unquantized anyway (Dynamo ran its
# frame eagerly) or a `layers` glob matches no linear: a warning, or an error (halo_compile/
# fallbacks.py).
FALLBACK_POLICIES = ("warn", "error")


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"halo option {key!r} must be one of {allowed}, got {value!r}")


def _check_keys(mapping: Mapping, allowed: tuple, where: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown option {unknown[0]!r}; allowed: {allowed}")


@dataclass(frozen=True)
class Hadamard:
    """Where each of a linear's three matmuls is rotated: "none", "inner" (along the matmul's
    contraction dimension, both operands) or "outer" (along the left operand's rows, undone on
    the output). See kernels/scaled_matmul.py."""

    forward: str = "none"
    grad_input: str = "none"
    grad_weight: str = "none"

    def __post_init__(self):
        for name in ("forward", "grad_input", "grad_weight"):
            _check_choice(f"hadamard.{name}", getattr(self, name), ROTATIONS)


HADAMARD_PRESETS = {
    # The HALO paper's levels (IST-DASLab/HALO, qllmt/nn/halo{0,1,2}_fns.py).
    "none": Hadamard(),
    "halo0": Hadamard(),
    "halo1": Hadamard(forward="inner"),
    "halo2": Hadamard(forward="inner", grad_input="outer"),
    # Every matmul rotated along its contraction dimension.
    "all_inner": Hadamard(forward="inner", grad_input="inner", grad_weight="inner"),
}


def parse_hadamard(value: Union[str, Mapping[str, str], Hadamard]) -> Hadamard:
    """A preset name, a dict {"forward", "grad_input", "grad_weight"} (missing keys: "none"),
    or a Hadamard."""
    if isinstance(value, Hadamard):
        return value
    if isinstance(value, str):
        _check_choice("hadamard", value, tuple(HADAMARD_PRESETS))
        return HADAMARD_PRESETS[value]
    if isinstance(value, Mapping):
        _check_keys(value, ("forward", "grad_input", "grad_weight"), "halo option 'hadamard'")
        return Hadamard(**value)
    raise ValueError(
        f"halo option 'hadamard' must be a preset name {tuple(HADAMARD_PRESETS)} or a dict, "
        f"got {value!r}"
    )


@dataclass(frozen=True)
class LayerConfig:
    """Settings of one linear layer; every field can be overridden per layer."""

    format: str = "fp8_e4m3"
    hadamard: Union[Hadamard, str, Mapping[str, str]] = "halo2"  # a Hadamard after init
    hadamard_block: Union[int, str] = 256
    scale: str = "row"
    grad_rounding: str = "nearest"
    # The forward FP8 GEMM accumulates in the tensor cores' fast mode (as torchao's float8
    # recipes do); the two gradient GEMMs always accumulate in float32.
    fast_accum: bool = True
    min_features: int = 64
    adapters: str = "high_precision"  # a LoRA lora_A / lora_B linear: "quantize" to quantize it
    # A trained weight rotated and quantized once per version (its version counter: once per
    # optimizer step) and kept for the forward and grad-input GEMMs of every micro-batch in
    # between, as frozen weights always are (kernels/weight_cache.py). With gradient
    # accumulation that saves the weight quantizations of all micro-batches but the first, for
    # 2 bytes of memory per weight element. Off by default: a weight written without autograd
    # seeing it (through `.data`) must then be followed by `halo_compile.forget_cached_weights()`.
    cache_weights: bool = False

    def __post_init__(self):
        object.__setattr__(self, "hadamard", parse_hadamard(self.hadamard))
        _check_choice("format", self.format, FORMATS)
        _check_choice("scale", self.scale, GRANULARITIES)
        _check_choice("grad_rounding", self.grad_rounding, ROUNDINGS)
        _check_choice("adapters", self.adapters, ADAPTER_POLICIES)
        block = self.hadamard_block
        if block != "full" and not (
            isinstance(block, int) and not isinstance(block, bool) and block >= 16
            and block & (block - 1) == 0
        ):
            raise ValueError(f"halo option 'hadamard_block' must be a power of two >= 16 or "
                             f"'full', got {block!r}")
        for name in ("fast_accum", "cache_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"halo option {name!r} must be True or False, got "
                                 f"{getattr(self, name)!r}")
        if (not isinstance(self.min_features, int) or isinstance(self.min_features, bool)
                or self.min_features < 1):
            raise ValueError(
                f"halo option 'min_features' must be a positive int, got {self.min_features!r}"
            )

    @property
    def max_block(self) -> int:
        """The block limit as the kernels take it: 0 means no limit ("full")."""
        return 0 if self.hadamard_block == "full" else self.hadamard_block


LAYER_KEYS = tuple(f.name for f in dataclasses.fields(LayerConfig))


@dataclass(frozen=True)
class HaloConfig:
    """All options of the `halo` backend.

    `layers` maps module-name globs (fnmatch syntax: "lm_head", "*.mlp.down_proj",
    "model.layers.0.*") to a partial LayerConfig dict, or to None to leave matching linears in
    high precision. Every matching pattern applies, in the order given, over the defaults.
    """

    defaults: LayerConfig = LayerConfig()
    layers: tuple[tuple[str, Optional[Mapping[str, Any]]], ...] = ()
    nonfinite: str = "raise"
    compiler: str = "inductor"
    rotate: str = "online"
    # Replay each compiled graph as CUDA graphs (Inductor's cudagraph trees, what
    # mode="reduce-overhead" turns on): no launch overhead where the host, not the GPU, limits a
    # step. The inf/NaN report stays outside the graphs (passes/batch_nonfinite_checks.py).
    cudagraphs: bool = False
    # "warn" or "error" when a linear to quantize runs eagerly in high precision, or a `layers`
    # glob matches no linear (halo_compile/fallbacks.py).
    on_fallback: str = "warn"

    def __post_init__(self):
        _check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _check_choice("on_fallback", self.on_fallback, FALLBACK_POLICIES)
        _check_choice("compiler", self.compiler, COMPILERS)
        _check_choice("rotate", self.rotate, ROTATE_MODES)
        if not isinstance(self.cudagraphs, bool):
            raise ValueError(f"halo option 'cudagraphs' must be True or False, got "
                             f"{self.cudagraphs!r}")
        if self.cudagraphs and self.compiler != "inductor":
            raise ValueError(f"halo option 'cudagraphs' needs compiler 'inductor', got "
                             f"{self.compiler!r}")
        for pattern, override in self.layers:
            if not isinstance(pattern, str):
                raise ValueError(f"halo option 'layers': keys must be strings, got {pattern!r}")
            if override is not None:
                self._apply(self.defaults, override, f"layers[{pattern!r}]")  # validates

    @classmethod
    def from_options(cls, options: Union["HaloConfig", Mapping[str, Any], None]) -> "HaloConfig":
        """Build a config from what `torch.compile(..., options=...)` passes to the backend."""
        if options is None:
            return cls()
        if isinstance(options, HaloConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"halo options must be a dict or HaloConfig, got {type(options)}")
        global_keys = ("layers", "nonfinite", "compiler", "rotate", "cudagraphs", "on_fallback")
        _check_keys(options, LAYER_KEYS + global_keys, "halo options")
        defaults = cls._apply(LayerConfig(), {k: v for k, v in options.items() if k in LAYER_KEYS},
                              "halo options")
        layers = options.get("layers") or {}
        if not isinstance(layers, Mapping):
            raise ValueError("halo option 'layers' must map module-name globs to dicts or None")
        return cls(
            defaults=defaults,
            layers=tuple((pattern, dict(o) if isinstance(o, Mapping) else o)
                         for pattern, o in layers.items()),
            nonfinite=options.get("nonfinite", "raise"),
            compiler=options.get("compiler", "inductor"),
            rotate=options.get("rotate", "online"),
            cudagraphs=options.get("cudagraphs", False),
            on_fallback=options.get("on_fallback", "warn"),
        )

    def for_layer(self, fqn: str) -> Optional[LayerConfig]:
        """The settings for the linear named `fqn`, or None if the user excluded it."""
        config: Optional[LayerConfig] = self.defaults
        for pattern, override in self.layers:
            if fnmatch.fnmatchcase(fqn, pattern):
                config = None if override is None else self._apply(
                    config or self.defaults, override, f"layers[{pattern!r}]")
        return config

    def excluded_by(self, fqn: str) -> Optional[str]:
        """The last pattern that excludes `fqn` (maps it to None), for the report."""
        hit = None
        for pattern, override in self.layers:
            if fnmatch.fnmatchcase(fqn, pattern):
                hit = pattern if override is None else None
        return hit

    def unmatched_layer_globs(self, names) -> list[str]:
        """The `layers` globs that match none of `names` (the linears' module names)."""
        names = list(names)
        return [pattern for pattern, _ in self.layers
                if not any(fnmatch.fnmatchcase(name, pattern) for name in names)]

    @staticmethod
    def _apply(base: LayerConfig, override: Mapping[str, Any], where: str) -> LayerConfig:
        if not isinstance(override, Mapping):
            raise ValueError(f"{where} must be a dict of layer options or None, got {override!r}")
        _check_keys(override, LAYER_KEYS, where)
        return dataclasses.replace(base, **override)


def config_from_call(options: Union[HaloConfig, Mapping[str, Any], None],
                     kwargs: Mapping[str, Any]) -> HaloConfig:
    """The validated config of an API call that takes options as a dict/HaloConfig or as
    keywords (`configure(model, format="int8")`), not both."""
    if options is not None and kwargs:
        raise ValueError("pass halo options either as a dict/HaloConfig or as keywords, not both")
    return HaloConfig.from_options(options if options is not None else kwargs)
