"""The state the passes share over one graph: the graph, its inputs and config, what the analysis
found, the report rows and what rotate="fused" folded. Its own module, so that the passes can
name it without importing the manager that runs them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from halo_compile.config import HaloConfig
from halo_compile.report import LayerReport

from .analysis import GraphAnalysis
from .autocast_regions import ambient_autocast_dtype
from .folding import FusionState
from .graph_utils import GraphTensors


@dataclass
class PassContext:
    gm: fx.GraphModule
    example_inputs: Sequence
    config: HaloConfig
    tensors: GraphTensors
    analysis: GraphAnalysis = field(default_factory=GraphAnalysis)
    layer_reports: list[LayerReport] = field(default_factory=list)
    fusion: FusionState = field(default_factory=FusionState)  # rotate="fused": what was folded
    subgraphs: list["PassContext"] = field(default_factory=list)  # of the rewritten subgraphs
    # How the quantized ops name a linear in their inf/NaN errors. The name is baked into the
    # graph, which a regionally compiled block shares with every block of its kind: there it
    # says so (halo_compile/report.py, `Region.name_in_errors`).
    name_in_errors: Callable[[str], str] = str
    # The autocast dtype of a device type where the graph is entered (None: autocast off):
    # around the compiled call for a Dynamo graph, at the higher-order op's call for a subgraph.
    autocast_at_entry: Callable[[str], Optional[torch.dtype]] = ambient_autocast_dtype

    def replace_node(self, old: fx.Node, new: fx.Node,
                     keep_use: Callable[[fx.Node], bool] = lambda user: False) -> None:
        """The one way passes change the graph under the analysis: every use of `old` becomes a
        use of `new` (but `new`'s own, and those `keep_use` accepts), and every analysis and
        fusion record that names `old` names `new`, so that no pass keeps records current by
        hand."""
        old.replace_all_uses_with(new, delete_user_cb=lambda user: (
            user is not new and not keep_use(user)))
        for record in (*self.analysis.records(), *self.fusion.scale_free_norms):
            _replace_in_record(record, old, new)

    def describe(self) -> list[str]:
        """The analysis' lines and the fusion notes, of this graph and of its subgraphs."""
        lines = self.analysis.describe() + self.fusion.notes
        for child in self.subgraphs:
            lines += [line for line in child.describe() if line not in lines]
        return lines


def _replace_in_record(record, old: fx.Node, new: fx.Node) -> None:
    """`old` -> `new` in a record's fields: the node itself, or a member of a set or list."""
    for name in (f.name for f in dataclasses.fields(record)):
        value = getattr(record, name)
        if value is old:
            setattr(record, name, new)
        elif isinstance(value, set) and old in value:
            value.discard(old)
            value.add(new)
        elif isinstance(value, list) and any(item is old for item in value):
            setattr(record, name, [new if item is old else item for item in value])
