"""Inductor post-grad pass: gradients that an "outer" rotation leaves rotated are added before
the rotation is undone, so it is undone once.

HALO-2's grad-input is rotated along the tokens, dX = Hᵀ [Q(H dY) Q(W)], and its decomposition
undoes H on the GEMM's output with one batched product by the ±1 block S per block of `b` rows
(`unrotate_rows`, kernels/scaled_matmul.py). In the post-grad graph:

    view(bmm(expand(S, [T/b, b, b]), view(out, [T/b, b, N])), [T, N])

Linears that read one activation (q/k/v, gate/up) each return such a dX, and autograd adds
them. The product is linear, so this pass rewrites

    add(unrotate(a), unrotate(b))  ->  unrotate(add(a, b))

(each side possibly followed by the same slice of its first T rows, where the tokens were
zero-padded to a multiple of the block: the slice then follows the merged un-rotation).

one batched product (a bf16 GEMM reading and writing [T, N]) instead of one per linear: a Llama
layer's backward undoes 4 rotations instead of 7. A chain of adds folds pairwise.

Only what is certainly halo's un-rotation is rewritten: both products by the same S expanded
alike, a [b, b] constant of the graph (computed from no input: the ±1 block is built from an index
grid), and results with no other user (else the product would still be computed). The sum of
the rotated outputs then rounds once, in the output's dtype, instead of after each product.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
import torch.fx as fx

_LOG = logging.getLogger(__name__)

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class _Unrotation(NamedTuple):
    """A GEMM output `out` un-rotated: `left` (S expanded to [T / b, b, b]) times `out` viewed
    as `rows_shape`, the product viewed as `out_shape` (shapes as the graph's own arguments:
    sizes may be symbolic)."""
    signs: tuple  # S and how it is expanded
    rows_shape: list
    out_shape: list
    left: fx.Node
    out: fx.Node

    def merges_with(self, other: "_Unrotation") -> bool:
        """The same block, shapes and dtype: the sum of the outputs can be un-rotated once."""
        return (self.signs, self.rows_shape, self.out_shape, self.out.meta["val"].dtype) == (
            other.signs, other.rows_shape, other.out_shape, other.out.meta["val"].dtype)


def merge_unrotations(graph: fx.Graph) -> int:
    """Rewrite `graph` in place as the module docstring says. Returns how many un-rotations
    (batched products) it removed."""
    removed = 0
    erased: set[fx.Node] = set()
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.add.Tensor]:
        if node in erased or node.kwargs or len(node.args) != 2:
            continue
        (first, first_rows), (second, second_rows) = (_rows_kept(arg) for arg in node.args)
        first, second = _unrotation(first), _unrotation(second)
        if (first is None or second is None or not first.merges_with(second)
                or first_rows != second_rows):
            continue
        with graph.inserting_before(node):
            total = _call(graph, aten.add.Tensor, first.out, second.out)
            rows = _call(graph, _VIEWS[0], total, first.rows_shape)
            product = _call(graph, aten.bmm.default, first.left, rows)
            merged = _call(graph, _VIEWS[0], product, first.out_shape)
            if first_rows is not None:
                merged = _call(graph, aten.slice.Tensor, merged, *first_rows)
        node.replace_all_uses_with(merged)
        _erase_unused(graph, node, erased)
        removed += 1
    _LOG.debug("%d un-rotations merged into others", removed)
    return removed


def _rows_kept(node):
    """(`node` below a slice of its leading rows, the slice's arguments) -- the un-rotation of
    tokens zero-padded to a multiple of the block keeps the first T rows -- or (`node`, None)."""
    if (_call_of(node, aten.slice.Tensor) and len(node.users) == 1 and not node.kwargs
            and (node.args[1:2] or (0,))[0] == 0):
        return node.args[0], tuple(node.args[1:])
    return node, None


def _unrotation(node) -> Optional[_Unrotation]:
    """`node` as an un-rotated GEMM output (viewed), each step used only on the way to `node`;
    else None."""
    if not _call_of(node, *_VIEWS) or len(node.users) != 1:
        return None
    out_shape = node.args[1]
    product = _strip(node, _VIEWS)
    if not _call_of(product, aten.bmm.default) or len(product.users) != 1:
        return None
    left, rows = product.args
    expanded = _strip(left, _VIEWS, single_use=False)
    if not _call_of(expanded, aten.expand.default) or not _constant(expanded.args[0]):
        return None
    square = expanded.args[0].meta["val"].shape
    if len(square) != 2 or square[0] != square[1]:
        return None
    rows_view = None  # the view of the output as [T / b, b, N] (matmul adds no-op expands)
    while _call_of(rows, *_VIEWS, aten.expand.default) and len(rows.users) == 1:
        rows_view = rows if rows.target in _VIEWS else rows_view
        rows = rows.args[0]
    shape = rows.meta["val"].shape if isinstance(rows, fx.Node) else ()
    if rows_view is None or len(shape) != 2:
        return None
    return _Unrotation((expanded.args[0], *expanded.args[1:]), rows_view.args[1], out_shape,
                       left, rows)


def _strip(node, targets, single_use=True):
    """Below the nodes of `targets` on top of `node` (only those whose input leads only to
    them, with `single_use`)."""
    while _call_of(node, *targets):
        inner = node.args[0]
        if not isinstance(inner, fx.Node) or single_use and len(inner.users) != 1:
            break
        node = inner
    return node


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    """A new node `target(*args)`, with its value computed on the arguments' fake values."""
    node = graph.call_function(target, args)
    values = fx.node.map_arg(args, lambda n: n.meta["val"])
    fake_mode = next(v.fake_mode for v in values if hasattr(v, "fake_mode"))
    with fake_mode:
        node.meta["val"] = target(*values)
    return node


def _call_of(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _constant(node: fx.Node) -> bool:
    """Whether `node` is computed from no graph input."""
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return False
        for source in current.all_input_nodes:
            if source not in seen:
                seen.add(source)
                stack.append(source)
    return True


def _erase_unused(graph: fx.Graph, node, erased: set[fx.Node]) -> None:
    """Erase `node` and, transitively, what only it used (the old products and views; the
    expanded S stays while another product reads it)."""
    if (not isinstance(node, fx.Node) or node.users or node.op != "call_function"
            or node.is_impure()):
        return
    sources = node.all_input_nodes
    graph.erase_node(node)
    erased.add(node)
    for source in sources:
        _erase_unused(graph, source, erased)
