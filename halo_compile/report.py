"""What the backend did to each linear, and where the user gets it: `halo_compile.report(model)`.

Every compiled graph leaves a GraphRecord that holds weak references to the parameters it read;
`report(model)` collects the records whose parameters belong to `model`.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from halo_compile.distributed import unsharded_parameters
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

    def row(self) -> list[str]:
        shape = f"{self.in_features}->{self.out_features}"
        if not self.quantized:
            return [self.fqn, shape, "high precision", self.rotation, "", "", self.reason]
        grad_weight = "frozen (cached weight)" if self.frozen else str(self.grad_weight)
        forward = self.rotation or str(self.forward)
        return [self.fqn, shape, f"{self.format}/{self.scale}", forward,
                str(self.grad_input), grad_weight,
                "weight cached per version" if self.weight_cache == "cached" else self.weight_cache]


@dataclass
class GraphRecord:
    layers: list[LayerReport]
    structure: list[str]  # one line per attention / norm / residual found by the analysis
    # id(parameter) -> weak reference. Not a WeakSet: that compares members with Tensor.__eq__.
    parameters: "dict[int, weakref.ref]" = field(default_factory=dict)

    def add_parameters(self, params) -> None:
        self.parameters.update((id(p), weakref.ref(p)) for p in params)

    def reads_any_of(self, params: "dict[int, torch.Tensor]") -> bool:
        return any(key in params and ref() is params[key] for key, ref in self.parameters.items())


_RECORDS: deque = deque(maxlen=1024)


def record_graph(record: GraphRecord) -> None:
    _RECORDS.append(record)


@dataclass
class HaloReport:
    layers: list[LayerReport]
    structure: list[str]

    @property
    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.quantized]

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
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = (f"halo: {len(self.quantized)} of {len(self.layers)} linears quantized; "
                   f"{len(self.high_precision)} left in high precision")
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
    """The per-layer report of a model compiled with backend="halo" (after its first call)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module
    # Under FSDP2 the graphs read the unsharded parameters, not the sharded ones.
    params = {id(p): p for p in (*model.parameters(), *unsharded_parameters(model))}
    by_fqn: dict[str, LayerReport] = {}
    structure: list[str] = []
    for record in _RECORDS:
        if record.reads_any_of(params):
            by_fqn.update((layer.fqn, layer) for layer in record.layers)
            structure.extend(line for line in record.structure if line not in structure)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = sorted(by_fqn.values(),
                    key=lambda layer: (order.get(layer.fqn, len(order)), layer.fqn))
    return HaloReport(layers, structure)
