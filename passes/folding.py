"""What the rotation-fusion passes share (fuse_norms, rotate_residual, fold_online_rotations).

The passes never modify a parameter. They insert graph nodes that compute each folded weight from
the original parameter (`W' = W·diag(g)·Q`, ...), so the user's module and its `state_dict()` stay
in the original basis and the result is correct by construction (autograd flows through the
folds too). The functions below are those nodes' targets; `Q = diag(signs)·(I ⊗ H_block)` is a
(block-diagonal, sign-randomised) Hadamard rotation along a tensor's last dimension, its signs
drawn from an integer seed (None: no signs) by a hash of the position, computed in the graph, so
no tensor constant has to be added to the Dynamo graph and CPU and GPU draw the same signs.

Cost: for a trained weight the folds are recomputed on every call (one Hadamard pass over each
folded weight) unless Inductor constant-folds them (`torch._inductor.config.freezing = True`
under `torch.no_grad()`). A frozen weight's chain of folds (FOLD_FUNCTIONS) is taken out of the
graph by the quantize pass and run inside the frozen-weight cache, once per version. The report
lists the bytes of folded weights (`LayerReport.folded_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from halo_compile.kernels.hadamard import block_hadamard

from .analysis import LinearSite

# A hash whose every intermediate stays below 2^31: Inductor's Triton code may compute an int64
# arange in int32 (pytorch/pytorch#175966), and a product that overflowed there gave the
# compiled graph other signs than the eager fold (rotate="fused" outputs were garbage on CUDA).
_PRIME = 32749  # the largest prime below 2^15: products of two residues stay below 2^30
_MULTIPLIER = 17364


def random_signs(width: int, seed: int, device) -> torch.Tensor:
    """±1 (float32) for each of `width` positions, from a multiplicative hash of (seed, position)
    modulo a 15-bit prime (positions `_PRIME` apart share a sign). Int32 arithmetic that cannot
    overflow: identical in eager, in Inductor's generated code and on every device, with no
    generator state."""
    offset = (seed * 7919 + 1) % _PRIME
    x = (torch.arange(width, device=device, dtype=torch.int32) + offset) % _PRIME
    for _ in range(3):  # multiply, then square: the squaring breaks the linear pattern
        x = (x * _MULTIPLIER) % _PRIME
        x = (x * x + 12345) % _PRIME
    return 1.0 - 2.0 * ((x >> 7) & 1).to(torch.float32)


def rotate(t: torch.Tensor, seed: Optional[int], block: int) -> torch.Tensor:
    """`t Q` along the last dimension. For a weight [out, in] this rotates its input side
    (`y = (x Q)(W Q)ᵀ`); for a bias or an activation it rotates the value itself."""
    scaled = t if seed is None else t * random_signs(t.shape[-1], seed, t.device)
    return block_hadamard(scaled, block, dim=-1).to(t.dtype)


def unrotate(t: torch.Tensor, seed: Optional[int], block: int) -> torch.Tensor:
    """`t Qᵀ` along the last dimension: undoes `rotate` (H is symmetric and orthogonal)."""
    rotated = block_hadamard(t, block, dim=-1)
    if seed is not None:
        rotated = rotated * random_signs(t.shape[-1], seed, t.device)
    return rotated.to(t.dtype)


def rotate_output_side(weight: torch.Tensor, seed: Optional[int], block: int) -> torch.Tensor:
    """`Qᵀ W` for a weight [out, in]: the linear's output comes out rotated, `y Q`."""
    return rotate(weight.t(), seed, block).t()


def scale_input_side(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`W diag(scale)`: a norm's scale vector folded into the linear that reads the norm."""
    return (weight * scale).to(weight.dtype)


FOLD_FUNCTIONS = (rotate, rotate_output_side, scale_input_side)
"""What `fold_weight` computes a weight with: a frozen weight's chain of them is cached whole."""


@dataclass
class ScaleFreeNorm:
    """An RMSNorm whose scale was folded away: it now commutes with any orthogonal rotation of
    its input along the normalised (last) dimension."""

    input: fx.Node
    output: fx.Node
    nodes: set[fx.Node]


@dataclass
class FusionState:
    """What the fusion passes did, for the later passes and the report."""

    scale_free_norms: list[ScaleFreeNorm] = field(default_factory=list)
    # linears whose input arrives already rotated: no online forward Hadamard is needed
    prerotated: set[str] = field(default_factory=set)
    # linears whose input needs an online Hadamard: their forward matmul's "inner" rotation does
    # it (inside the quantize kernel, the weight side rotated with it)
    forward_hadamard: set[str] = field(default_factory=set)
    folds: dict[str, list[str]] = field(default_factory=dict)  # linear fqn -> what was folded
    not_fused: dict[str, list[str]] = field(default_factory=dict)  # linear fqn -> why not
    folded_bytes: dict[str, int] = field(default_factory=dict)  # linear fqn -> folded weight
    notes: list[str] = field(default_factory=list)  # graph-level: what was rotated, what not

    def note_not_fused(self, fqn: str, reason: str) -> None:
        reasons = self.not_fused.setdefault(fqn, [])
        if reason not in reasons:
            reasons.append(reason)

    def describe(self, fqn: str) -> str:
        """One line for the report: what was folded into this linear, and what was not."""
        parts = []
        if fqn in self.folds:
            parts.append("fused " + ", ".join(self.folds[fqn]))
        if fqn in self.not_fused:
            parts.append("not fused: " + "; ".join(self.not_fused[fqn]))
        return " | ".join(parts)


def foldable(site: LinearSite) -> str:
    """Why a linear's weight cannot take folds ("" when it can)."""
    if site.kind != "linear":
        return f"written as {site.kind}, not F.linear"
    return ""


def fold_weight(ctx, site: LinearSite, fn: Callable, args: tuple, what: str,
                bias_fn: Optional[Callable] = None) -> None:
    """Replace the linear's weight by `fn(weight, *args)` (and its bias by `bias_fn(bias, *args)`)
    computed in the graph, and record `what` for the report."""
    graph = ctx.gm.graph
    with graph.inserting_before(site.node):
        weight = graph.call_function(fn, (site.weight_node, *args))
        site.node.replace_input_with(site.weight_node, weight)
        site.weight_node = weight
        if bias_fn is not None and site.bias is not None:
            bias = graph.call_function(bias_fn, (site.bias, *args))
            site.node.replace_input_with(site.bias, bias)
            site.bias = bias
    ctx.fusion.folds.setdefault(site.fqn, []).append(what)
    ctx.fusion.folded_bytes[site.fqn] = site.weight.numel() * site.weight.element_size()


def insert_before_use(ctx, user: fx.Node, value: fx.Node, fn: Callable, args: tuple) -> fx.Node:
    """Compute `fn(value, *args)` right before `user` and make `user` read it instead of `value`."""
    with ctx.gm.graph.inserting_before(user):
        new = ctx.gm.graph.call_function(fn, (value, *args))
    user.replace_input_with(value, new)
    return new


def flows_only_into(start: fx.Node, target: fx.Node, position: dict[fx.Node, int]) -> set[fx.Node]:
    """The nodes between `start` and `target` when every use of `start`'s value, transitively,
    ends in `target`; an empty set when it escapes anywhere else (another op after `target`, a
    graph output such as a returned KV cache)."""
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        for user in node.users:
            if user is target:
                continue
            if user.op == "output" or position.get(user, -1) > position[target]:
                return set()
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen
