"""Transform (rotate="fused"): the rotations the residual stream's Q cannot provide.

Two linears that write the stream read activations that are not on it:
  o_proj reads the attention output. A per-head Hadamard H (block dividing head_dim) folded into
    v_proj's output side (W_v -> (I⊗H)ᵀ W_v, b_v -> b_v (I⊗H)) makes the values, hence the
    attention output (a per-head linear mix of values over positions), arrive rotated; o_proj
    takes H on its input side (W_o -> W_o (I⊗H)). Nothing runs online. Done only when v_proj's
    output reaches nothing but the attention's value input: a returned KV cache would otherwise
    hold rotated values.
  down_proj (and o_proj where the above does not apply) reads a product of activations: an
    online Hadamard on its input and its weight's input side, `(x H)(W H)ᵀ`. That is the forward
    matmul's "inner" rotation, which the quantize kernel applies in the pass that quantizes x
    (a Hadamard node in the graph would cost a pass of its own over the widest activation of
    the layer; measured on the H100, it made the fused model slower than the online one), and
    which the frozen-weight cache applies to a frozen weight once.
Linears whose inputs now arrive rotated run their forward matmul without a Hadamard; these two
run it with one, whatever the `hadamard` option says.
"""

from __future__ import annotations

import logging

import torch.fx as fx

from halo_compile.kernels.constants import MIN_BLOCK
from halo_compile.kernels.hadamard import hadamard_block_size

from .analysis import AttentionSite
from .find_norms import _linear_writers
from .folding import flows_only_into, fold_weight, foldable, rotate, rotate_output_side
from .graph_utils import (
    call_target_name,
    fake_value,
    linears_reading,
    node_arg,
    passthrough_descendants,
    program_order,
)

_LOG = logging.getLogger(__name__)


class FoldOnlineRotations:
    name = "fold_online_rotations"

    def run(self, ctx) -> None:
        if ctx.config.rotate != "fused":
            return
        linears = ctx.analysis.linear_by_node()
        position = program_order(ctx.gm.graph)
        for attention in ctx.analysis.attention:
            reason = _fold_value_heads(ctx, attention, linears, position)
            _LOG.debug("%s: per-head value rotation %s", attention.fqn,
                       f"not folded: {reason}" if reason else "folded")
            if reason:
                for fqn in (attention.v_proj, attention.o_proj):
                    if fqn:
                        ctx.fusion.note_not_fused(fqn, f"per-head value rotation: {reason}")
        writers = {fqn for add in ctx.analysis.residual_adds for fqn in add.writers}
        for site in ctx.analysis.linears:
            if site.fqn in writers and site.fqn not in ctx.fusion.prerotated:
                _online_hadamard(ctx, site)


def _value_input(attention: AttentionSite):
    core = attention.node
    if attention.kind == "sdpa":
        return node_arg(core, 2, "value"), {node_arg(core, 0, "query"), node_arg(core, 1, "key")}
    operands = core.args[1:3] if call_target_name(core) == "baddbmm" else core.args[:2]
    return operands[1], {operands[0]}


def _fold_value_heads(ctx, attention: AttentionSite, linears, position) -> str:
    if not attention.v_proj or not attention.o_proj:
        return "no value or output projection found"
    if attention.v_proj in (attention.q_proj, attention.k_proj):
        return "q/k/v come from one fused linear"
    value, other_inputs = _value_input(attention)
    head_dim = fake_value(value).shape[-1]
    block = hadamard_block_size(head_dim, 0)
    if not block:
        return f"no power-of-two block >= {MIN_BLOCK} divides head_dim={head_dim}"
    writers = _linear_writers(value, linears, {})
    readers = linears_reading(attention.node, linears)
    if not writers or not readers:
        return ("the values do not come straight from linears, or the output does not go "
                "straight to them (a KV cache in between?)")
    unfoldable = [f"{site.fqn} {why}" for site in (*writers, *readers) if (why := foldable(site))]
    if unfoldable:
        return "; ".join(unfoldable)
    for site in writers:
        path = flows_only_into(site.node, attention.node, position)
        if not path or path & {n for n in other_inputs if isinstance(n, fx.Node)}:
            return f"{site.fqn}'s output is used elsewhere too (a returned KV cache?)"
    allowed = {site.node for site in readers} | set(passthrough_descendants(attention.node))
    if any(user not in allowed
           for n in passthrough_descendants(attention.node) for user in n.users):
        return "the attention output is read by more than linears"
    for site in writers:
        fold_weight(ctx, site, rotate_output_side, (None, block), f"H{block}/head out",
                    bias_fn=rotate)
    for site in readers:
        fold_weight(ctx, site, rotate, (None, block), f"H{block}/head in")
        ctx.fusion.prerotated.add(site.fqn)
    return ""


def _online_hadamard(ctx, site) -> None:
    layer = ctx.config.for_layer(site.fqn)
    if layer is None:  # stays in high precision: a rotation would only cost time
        return
    block = hadamard_block_size(site.in_features, layer.max_block)
    if not block:
        ctx.fusion.note_not_fused(site.fqn, "online input Hadamard: no power-of-two block >= "
                                  f"{MIN_BLOCK} divides in_features={site.in_features}")
        return
    ctx.fusion.forward_hadamard.add(site.fqn)
    ctx.fusion.folds.setdefault(site.fqn, []).append(f"H{block} in (online on x, forward inner)")
