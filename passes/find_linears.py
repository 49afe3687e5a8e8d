"""Analysis: find every matmul of an activation against a 2-D weight parameter.

Recognised forms (as Dynamo records them):
    linear(x, W, b)                       nn.Linear, F.linear
    addmm(b, x, W_kn)                     GPT-2's Conv1D (weight stored [in, out])
    matmul(x, W_kn) / mm(x, W_kn)         x @ W, and x @ W.t() / W.T (weight stored [out, in])
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from .analysis import LinearSite
from .graph_utils import call_target_name, module_fqn, node_arg

_LOG = logging.getLogger(__name__)

_TRANSPOSES = ("t", "T", "transpose", "permute")


class FindLinears:
    name = "find_linears"

    def run(self, ctx) -> None:
        for node in ctx.gm.graph.nodes:
            site = self._match(node, ctx)
            if site is not None:
                ctx.analysis.linears.append(site)
        _LOG.debug("%d linears: %s", len(ctx.analysis.linears),
                   [site.fqn for site in ctx.analysis.linears])

    def _match(self, node: fx.Node, ctx) -> Optional[LinearSite]:
        if node.op != "call_function":
            return None
        target = node.target
        if target in (torch._C._nn.linear, torch.nn.functional.linear):
            x, w = node.args[0], node_arg(node, 1, "weight")
            bias = node_arg(node, 2, "bias")
            return self._site(node, "linear", x, w, False, bias, ctx)
        if target is torch.addmm and not node.kwargs:
            bias, x, w = node.args[:3]
            return self._site(node, "addmm", x, *self._weight_kn(w), bias, ctx)
        if target in (torch.matmul, torch.mm, operator.matmul) and len(node.args) == 2:
            x, w = node.args
            return self._site(node, "matmul", x, *self._weight_kn(w), None, ctx)
        return None

    @staticmethod
    def _weight_kn(node):
        """A [in, out] right operand: the parameter itself (stored [in, out]) or a transpose of
        a parameter stored [out, in]. Returns (parameter node, stored transposed?)."""
        if (
            isinstance(node, fx.Node)
            and node.op in ("call_method", "call_function")
            and call_target_name(node) in _TRANSPOSES
            and _is_2d_swap(node)
        ):
            return node.args[0], False
        if (  # `W.T` / `W.mT`: Dynamo records the attribute read as getattr(W, "T")
            isinstance(node, fx.Node)
            and node.op == "call_function"
            and node.target is getattr
            and len(node.args) == 2
            and node.args[1] in ("T", "mT")
        ):
            return node.args[0], False
        return node, True

    @staticmethod
    def _site(node, kind, x, weight_node, transposed, bias, ctx) -> Optional[LinearSite]:
        weight = ctx.tensors.parameter(weight_node)
        if weight is None or weight.dim() != 2 or not isinstance(x, fx.Node):
            return None
        if bias is not None and not isinstance(bias, fx.Node):
            return None
        fqn = module_fqn(node)
        if not fqn:  # a functional call at the root: name it after its weight
            fqn = (ctx.tensors.source_name(weight_node) or weight_node.name).removesuffix(".weight")
        return LinearSite(node, fqn, kind, x, weight_node, weight, transposed, bias)


def _is_2d_swap(node: fx.Node) -> bool:
    name = call_target_name(node)
    if name in ("t", "T"):
        return True
    dims = tuple(node.args[1:])
    if name == "transpose":
        return sorted(d % 2 for d in dims) == [0, 1] if len(dims) == 2 else False
    if name == "permute":
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        return tuple(dims) == (1, 0)
    return False
