"""What the analysis passes find in a graph: plain data that later passes and the report use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from .graph_utils import GraphTensors


@dataclass
class LinearSite:
    """A matmul of an activation against a 2-D weight parameter: `y = x @ weightᵀ (+ bias)`."""

    node: fx.Node
    fqn: str
    kind: str  # "linear" | "addmm" | "matmul": how the graph wrote it
    x: fx.Node
    weight_node: fx.Node
    weight: torch.nn.Parameter
    weight_transposed: bool  # the parameter is stored [in, out] (e.g. GPT-2's Conv1D)
    bias: Optional[fx.Node]

    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.weight_transposed else 1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.weight_transposed else 0]


@dataclass
class AttentionSite:
    """An attention core (SDPA or the eager softmax(QKᵀ)V) with the linears around it."""

    node: fx.Node  # the SDPA call, or the final matmul of the eager form
    fqn: str
    kind: str  # "sdpa" | "eager"
    q_proj: Optional[str] = None
    k_proj: Optional[str] = None
    v_proj: Optional[str] = None
    o_proj: Optional[str] = None


@dataclass
class NormSite:
    """A normalization layer and the linears that read its output."""

    fqn: str
    kind: str  # "rmsnorm" | "layernorm"
    output: fx.Node
    weight: Optional[torch.nn.Parameter]
    feeds: list[str] = field(default_factory=list)


@dataclass
class ResidualAdd:
    """An add on the residual stream: `stream + writer(...)`, where writer is a linear."""

    node: fx.Node
    fqn: str
    writers: list[str] = field(default_factory=list)


@dataclass
class SubgraphSite:
    """A subgraph that a higher-order op calls (a checkpointed region, a nested compile region),
    with its placeholders mapped to the tensors the op passes in their place."""

    node: fx.Node  # the higher-order op's call
    hop: str  # its name: "tag_activation_checkpoint", "invoke_subgraph", ...
    body: fx.GraphModule
    tensors: "GraphTensors"  # the body's placeholders resolved through the outer graph
    skip_reason: str = ""  # why halo's passes do not rewrite it; "" when they do


@dataclass
class GraphAnalysis:
    linears: list[LinearSite] = field(default_factory=list)
    attention: list[AttentionSite] = field(default_factory=list)
    norms: list[NormSite] = field(default_factory=list)
    residual_adds: list[ResidualAdd] = field(default_factory=list)
    subgraphs: list[SubgraphSite] = field(default_factory=list)

    def records(self):
        """Every record the analysis holds."""
        return (*self.linears, *self.attention, *self.norms, *self.residual_adds,
                *self.subgraphs)

    def linear_by_node(self) -> dict[fx.Node, LinearSite]:
        return {site.node: site for site in self.linears}

    def describe(self) -> list[str]:
        """One line per attention, norm and residual add, for the report."""
        lines = []
        for a in self.attention:
            lines.append(f"attention {a.fqn} ({a.kind}): q={a.q_proj} k={a.k_proj} "
                         f"v={a.v_proj} o={a.o_proj}")
        for n in self.norms:
            lines.append(f"{n.kind} {n.fqn} -> {', '.join(n.feeds) or '(no linear)'}")
        for r in self.residual_adds:
            lines.append(f"residual add in {r.fqn or '(root)'} <- {', '.join(r.writers)}")
        return lines
