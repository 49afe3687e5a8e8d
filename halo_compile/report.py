"""What the backend did to each linear, and where the user gets it: `halo_compile.report(model)`.

Every compiled graph leaves a GraphRecord that holds weak references to the parameters it read
and to the module it was compiled from (Dynamo's `self`), whose linears it names relative to that
module; `report(model)` collects the records whose parameters belong to `model` and names their
linears from the model's root. A block compiled regionally (`compile_in_place`: a `Region` of
blocks of one class) is compiled once, from the first block called, and every block of its
region runs that graph: the report lists its linears under each block's name, marked as sharing
the graph of the block it was compiled from.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from halo_compile.fsdp_parameters import unsharded_parameters
from halo_compile.kernels.weight_cache import WEIGHT_CACHE


@dataclass(frozen=True)
class MatmulPlan:
    """One of a linear's three matmuls: its rotation and the Hadamard block along `dim`."""

    rotation: str  # "none" | "inner" | "outer"
    dim: str = ""  # which dimension is rotated: "in", "out" or "tokens"
    block: int = 0  # 0: not rotated
    note: str = ""  # why a requested rotation is not applied, or how it was chosen

    def __str__(self) -> str:
        if self.rotation == "none":
            return "-"
        if self.block:
            text = f"{self.rotation}:{self.dim}/{self.block}"
        else:
            text = "unrotated"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class LayerReport:
    fqn: str
    in_features: int
    out_features: int
    quantized: bool
    format: str = ""
    scale: str = ""
    forward: Optional[MatmulPlan] = None
    grad_input: Optional[MatmulPlan] = None
    grad_weight: Optional[MatmulPlan] = None
    reason: str = ""  # why the layer stays in high precision
    frozen: bool = False  # weight needs no grad: quantized once per version, no grad-weight matmul
    rotation: str = ""  # rotate="fused": what was folded into the weight, or why not
    folded_bytes: int = 0  # size of the folded weight the graph computes from the parameter
    # option cache_weights: "cached" (quantized once per version), "not cached: <why>", or ""
    weight_cache: str = ""
    # The block whose graph this layer's block runs (regional compilation), "" for its own graph.
    shared_with: str = ""
    # Why the layer also ran eagerly, in high precision, although its graph quantizes it (Dynamo
    # ran the frame without its compiled graph: halo_compile/fallbacks.py); "" when it did not.
    fallback: str = ""

    def row(self) -> list[str]:
        shape = f"{self.in_features}->{self.out_features}"
        if not self.quantized:
            return [self.fqn, shape, "high precision", self.rotation, "", "", self.reason]
        grad_weight = "frozen (cached weight)" if self.frozen else str(self.grad_weight)
        forward = self.rotation or str(self.forward)
        note = "weight cached per version" if self.weight_cache == "cached" else self.weight_cache
        if self.shared_with:
            note = "; ".join(filter(None, (f"graph shared with {self.shared_with}", note)))
        if self.fallback:
            note = "; ".join(filter(None, (f"RAN EAGERLY, high precision: {self.fallback}",
                                           note)))
        return [self.fqn, shape, f"{self.format}/{self.scale}", forward,
                str(self.grad_input), grad_weight, note]


@dataclass
class GraphRecord:
    layers: list[LayerReport]
    structure: list[str]  # one line per attention / norm / residual found by the analysis
    # id(parameter) -> weak reference. Not a WeakSet: that compares members with Tensor.__eq__.
    parameters: "dict[int, weakref.ref]" = field(default_factory=dict)
    # The Dynamo frame the graph was compiled from (fallbacks.DynamoFrame), the config it was
    # compiled with, and why Dynamo ran that frame eagerly since (each reason once).
    frame: Any = None
    config: Any = None
    fallbacks: list[str] = field(default_factory=list)
    finished: bool = True  # False while (or if) halo's passes have not run to the end
    # The module the graph was compiled from (Dynamo's `self`; a weak reference), to which the
    # layers' names are relative. None for a function, or a frame without `self`.
    module: Optional["weakref.ref[torch.nn.Module]"] = None

    def compiled_from(self) -> Optional[torch.nn.Module]:
        return self.module() if self.module is not None else None

    def name_in_messages(self, fqn: str) -> str:
        """How messages name the record's layer `fqn`: with its region, if any."""
        region = region_of(self.compiled_from())
        return region.name_in_errors(fqn) if region is not None else fqn

    @property
    def asks_quantization(self) -> bool:
        """Whether the graph quantizes a linear (or would have, had its compilation finished)."""
        return not self.finished or any(layer.quantized for layer in self.layers)

    def add_parameters(self, params) -> None:
        self.parameters.update((id(p), weakref.ref(p)) for p in params)

    def has_live_parameters(self) -> bool:
        """Whether a parameter the graph reads still exists (its model does)."""
        return not self.parameters or any(ref() is not None for ref in self.parameters.values())

    def reads_any_of(self, params: "dict[int, torch.Tensor]") -> bool:
        return any(key in params and ref() is params[key] for key, ref in self.parameters.items())


_RECORDS: deque = deque(maxlen=1024)


@dataclass(eq=False)
class Region:
    """Modules compiled in place one by one that run one compiled code: the blocks of one class
    in a ModuleList (`model.layers.0`, `model.layers.1`, ...), or a single module outside them.
    Dynamo compiles the code once, from the first module called, and the others reuse its graph:
    names baked into that graph (the inf/NaN errors') are relative to the module and say so."""

    pattern: str  # "model.layers.*" for blocks; the module's name for a single module
    modules: "list[weakref.ref[torch.nn.Module]]" = field(default_factory=list)

    @property
    def shared(self) -> bool:
        return len(self.modules) > 1

    def live_modules(self) -> "list[torch.nn.Module]":
        return [module for ref in self.modules if (module := ref()) is not None]

    def name_in_errors(self, fqn: str) -> str:
        if self.shared:
            return f"{fqn or '(the block)'} in a block compiled once for all {self.pattern}"
        return self.pattern if fqn == "weight" else _join_name(self.pattern, fqn)


# Each module compiled regionally -> its region (halo_compile/integrations.py registers them).
_REGIONS: "weakref.WeakKeyDictionary[torch.nn.Module, Region]" = weakref.WeakKeyDictionary()


def register_region(pattern: str, modules: "list[torch.nn.Module]") -> Region:
    region = Region(pattern, [weakref.ref(module) for module in modules])
    for module in modules:
        _REGIONS[module] = region
    return region


def region_of(module: Optional[torch.nn.Module]) -> Optional[Region]:
    return _REGIONS.get(module) if module is not None else None


def _join_name(prefix: str, fqn: str) -> str:
    return ".".join(filter(None, (prefix, fqn)))


def record_graph(record: GraphRecord) -> None:
    _RECORDS.append(record)


def graph_records() -> "list[GraphRecord]":
    """Every record kept, oldest first."""
    return list(_RECORDS)


def records_of(model: torch.nn.Module) -> "list[GraphRecord]":
    """The records of the graphs that read `model`'s parameters (under FSDP2: the unsharded
    ones, which the graphs read)."""
    params = {id(p): p for p in (*model.parameters(), *unsharded_parameters(model))}
    return [record for record in _RECORDS if record.reads_any_of(params)]


@dataclass
class HaloReport:
    layers: list[LayerReport]
    structure: list[str]
    # Frames Dynamo ran eagerly (so the linears in them ran in high precision), one line each.
    eager_frames: list[str] = field(default_factory=list)
    # `layers` globs of the options that match no linear of the model.
    unmatched_globs: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def fell_back(self) -> list[LayerReport]:
        """The layers quantized in their graph that also ran eagerly, in high precision."""
        return [layer for layer in self.layers if layer.fallback]

    @property
    def high_precision(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.quantized]

    def __getitem__(self, fqn: str) -> LayerReport:
        for layer in self.layers:
            if layer.fqn == fqn:
                return layer
        raise KeyError(fqn)

    def __str__(self) -> str:
        header = ["layer", "in->out", "format", "forward", "grad-input", "grad-weight", "reason"]
        rows = [header] + [layer.row() for layer in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = (f"halo: {len(self.quantized)} of {len(self.layers)} linears quantized; "
                   f"{len(self.high_precision)} left in high precision")
        if self.fell_back:
            summary += (f"; {len(self.fell_back)} of the quantized ones also RAN EAGERLY in high "
                        "precision (Dynamo ran their frame without its graph):")
            summary += "".join(f"\n  {line}" for line in self.eager_frames)
        elif self.eager_frames:
            summary += "".join(f"\nran eagerly: {line}" for line in self.eager_frames)
        if self.unmatched_globs:
            summary += "".join(f"\nlayers[{glob!r}] matches no linear"
                               for glob in self.unmatched_globs)
        folded = sum(layer.folded_bytes for layer in self.layers if not layer.frozen)
        if folded:
            summary += (f"\nrotate='fused': {folded / 2**20:.2f} MiB of folded weights computed "
                        "in the graph from the trained parameters on every call (Inductor "
                        "freezing computes them once; docs/rotation.md)")
        if any(layer.frozen or layer.weight_cache == "cached" for layer in self.layers):
            summary += (f"\nfrozen and cached weights: folded, rotated and quantized once per "
                        f"version; the cache holds {WEIGHT_CACHE.nbytes() / 2**20:.2f} MiB (all "
                        "models)")
        return "\n".join([summary, *lines, *(["", "structure:"] + self.structure
                                             if self.structure else [])])


def report(model: torch.nn.Module) -> HaloReport:
    """The per-layer report of a model compiled with backend="halo" (after its first call).

    Also says which quantized layers ran eagerly in high precision and why, and which `layers`
    globs match no linear of the model (warning, or raising under option on_fallback="error",
    once per glob: halo_compile/fallbacks.py)."""
    from halo_compile import fallbacks

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module
    module_names = {id(module): name for name, module in model.named_modules()}
    by_fqn: dict[str, LayerReport] = {}
    eager: dict[str, list[str]] = {}  # fqn -> why it ran eagerly, from every record
    eager_frames: list[str] = []
    structure: list[str] = []
    records = records_of(model)
    for record in records:
        rows = _rows_in_model(record, model, module_names)
        by_fqn.update((layer.fqn, layer) for layer in rows)
        structure.extend(line for line in record.structure if line not in structure)
        for reason in record.fallbacks:
            line = f"{record.frame}: {reason}"
            if line not in eager_frames:
                eager_frames.append(line)
            for layer in rows:  # every block running the frame's code
                if layer.quantized and reason not in eager.setdefault(layer.fqn, []):
                    eager[layer.fqn].append(reason)
    for fqn, reasons in eager.items():
        if fqn in by_fqn and by_fqn[fqn].quantized and reasons:
            by_fqn[fqn] = dataclasses.replace(by_fqn[fqn], fallback="; ".join(reasons))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = sorted(by_fqn.values(),
                    key=lambda layer: (order.get(layer.fqn, len(order)), layer.fqn))
    unmatched = fallbacks.check_layer_globs_of_records(model, records)
    return HaloReport(layers, structure, eager_frames, unmatched)


def _compiled_alike(source: torch.nn.Module, model: torch.nn.Module) -> "list[torch.nn.Module]":
    """`source` and, when it was compiled in place (`module.compile()`, as per-block compile
    under FSDP2 does), every module of `model` of its class compiled in place too: they run one
    code, so Dynamo reuses `source`'s graph for them (one that does not reuse it compiles a
    graph of its own, whose record then names it)."""
    if getattr(source, "_compiled_call_impl", None) is None:
        return [source]
    return [source, *(module for module in model.modules() if module is not source
                      and type(module) is type(source)
                      and getattr(module, "_compiled_call_impl", None) is not None)]


def _rows_in_model(record: GraphRecord, model: torch.nn.Module,
                   module_names: "dict[int, str]") -> "list[LayerReport]":
    """The record's layers under their names in `model`, for each module of `model` that runs
    the record's graph: the module it was compiled from and, when that module was compiled
    regionally, every other module of its region (marked as sharing the first one's graph).
    Names stay as recorded where the module is unknown or not in `model`."""
    source = record.compiled_from()
    if source is None or id(source) not in module_names:
        return list(record.layers)
    region = region_of(source)
    runners = region.live_modules() if region is not None else _compiled_alike(source, model)
    rows = []
    for module in runners:
        if id(module) not in module_names:
            continue
        prefix = module_names[id(module)]
        shared_with = "" if module is source else module_names[id(source)]
        rows.extend(dataclasses.replace(layer, fqn=_layer_name(model, prefix, layer.fqn),
                                        shared_with=shared_with)
                    for layer in record.layers)
    return rows


def _layer_name(model: torch.nn.Module, prefix: str, fqn: str) -> str:
    """`fqn`, relative to the module named `prefix`, from the model's root. A linear that is
    the compiled module itself (an `nn.Linear` compiled on its own) is named after its weight,
    "weight", in the graph: it takes the module's name."""
    name = _join_name(prefix, fqn)
    if prefix and fqn == "weight":
        try:
            model.get_submodule(name)
        except AttributeError:
            return prefix
    return name
