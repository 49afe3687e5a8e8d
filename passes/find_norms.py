"""Analysis: find the normalization layers (with the linears they feed) and the residual adds.

Norms, as Dynamo records them:
    layer_norm(x, shape, w, b)                     kind "layernorm" (nn.LayerNorm, F.layer_norm)
    rms_norm(x, shape, w)                          kind "rmsnorm"   (nn.RMSNorm, F.rms_norm)
    the nodes of a module whose class name         kind "rmsnorm"   (HF Llama/Qwen2/Mistral...:
      ends in "RMSNorm"                                              its output is its last node)
    x * rsqrt(mean(x²) + eps) [* w]                kind "rmsnorm"   (written out anywhere else)
A norm feeds the linears that read its output through re-layouts, casts and dropout.

Residual adds: `stream + writer`, where writer is a linear's output (up to re-layouts, casts,
dropout, scaling by a constant, or a sum of such: LoRA's base + lora_B) and stream is an ancestor
of that linear's input: the add closes a skip connection around the linear. That second condition
rejects adds of a linear's output with a function of itself (tanh-GELU's x + 0.044715·x³) or with
a sibling linear (inside LoRA).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from halo_compile.kernels.constants import ADD_OPS

from .analysis import LinearSite, NormSite, ResidualAdd
from .graph_utils import (
    call_target_name,
    fake_value,
    linears_reading,
    module_fqn,
    node_arg,
    normalize_module_path,
    passthrough_input,
    program_order,
    source_name,
    strip_passthroughs,
)

_LOG = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .context import PassContext
    from .graph_utils import GraphTensors

_LAYER_NORMS = (torch.nn.functional.layer_norm, torch.layer_norm)
_RMS_NORMS = (torch.nn.functional.rms_norm, torch.rms_norm)  # Dynamo records the latter
_SCALINGS = ("mul", "truediv", "div")


class FindNormsAndResiduals:
    name = "find_norms_residuals"

    def run(self, ctx: PassContext) -> None:
        graph = ctx.gm.graph
        position = program_order(graph)
        linears = ctx.analysis.linear_by_node()
        norms, inside_norms = _find_norms(graph, ctx.tensors)
        for norm in sorted(norms, key=lambda norm: position[norm.output]):
            readers = sorted(linears_reading(norm.output, linears), key=lambda s: position[s.node])
            norm.feeds = [site.fqn for site in readers]
            ctx.analysis.norms.append(norm)
        writers_memo: dict[fx.Node, list[LinearSite]] = {}
        for node in graph.nodes:
            if node not in inside_norms:
                residual = _residual_add(node, linears, position, writers_memo)
                if residual is not None:
                    ctx.analysis.residual_adds.append(residual)
        _LOG.debug("%d norms (%s), %d residual adds", len(ctx.analysis.norms),
                   ", ".join(f"{n.fqn} -> {n.feeds}" for n in ctx.analysis.norms),
                   len(ctx.analysis.residual_adds))


def _find_norms(graph: fx.Graph, tensors: GraphTensors) -> tuple[list[NormSite], set[fx.Node]]:
    """Every norm, and the set of nodes that compute them. A norm module's own nodes are claimed
    first, so that the rms_norm call or rsqrt pattern inside it is not found a second time."""
    norms, inside = [], set()
    for path, nodes in _rmsnorm_module_calls(graph):
        weight = next((p for n in nodes for src in n.all_input_nodes
                       if (p := tensors.parameter(src)) is not None), None)
        norms.append(NormSite(normalize_module_path(path), "rmsnorm", nodes[-1], weight))
        inside.update(nodes)
    for node in graph.nodes:
        if node in inside:
            continue
        kind = _functional_norm_kind(node)
        if kind:
            weight_node = node_arg(node, 2, "weight")
            norms.append(NormSite(_norm_fqn(node, weight_node), kind, node,
                                  tensors.parameter(weight_node)))
            inside.add(node)
        elif _is_call(node, ("rsqrt",)):
            match = _match_rms_pattern(node, tensors)
            if match is not None:
                nodes, weight_node = match
                norms.append(NormSite(_norm_fqn(node, weight_node), "rmsnorm", nodes[-1],
                                      tensors.parameter(weight_node)))
                inside.update(nodes)
    return norms, inside


def _functional_norm_kind(node: fx.Node) -> str:
    if node.op != "call_function":
        return ""
    if node.target in _LAYER_NORMS:
        return "layernorm"
    return "rmsnorm" if node.target in _RMS_NORMS else ""


def _rmsnorm_module_calls(graph: fx.Graph) -> list[tuple[str, list[fx.Node]]]:
    """(module path, computing nodes) of each call of a module whose class name ends in "RMSNorm".
    Calls are told apart by Dynamo's module-stack key ("@1" marks a module's second call)."""
    calls: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        for key, (path, module_cls) in reversed(list(node.meta.get("nn_module_stack", {}).items())):
            # the class is a type in recent torch, its qualified name in some older versions
            class_name = getattr(module_cls, "__name__", str(module_cls))
            if class_name.endswith("RMSNorm"):
                calls.setdefault(key, (path, []))[1].append(node)
                break
    return list(calls.values())


def _match_rms_pattern(rsqrt: fx.Node, tensors: GraphTensors
                       ) -> Optional[tuple[list[fx.Node], Optional[fx.Node]]]:
    """x * rsqrt(mean(x²) + eps), then casts and `* weight`: (its nodes, output last; the weight
    node), or None."""
    eps_add = rsqrt.args[0] if rsqrt.args else None
    if not _is_call(eps_add, ADD_OPS) or not _has_constant(eps_add):
        return None
    mean = next(a for a in eps_add.args if isinstance(a, fx.Node))
    if not _is_call(mean, ("mean",)) or not _is_square(mean.args[0]):
        return None
    x = strip_passthroughs(mean.args[0].args[0])  # x.float() may be written once per use
    normalized = next((u for u in rsqrt.users if _is_call(u, ("mul",)) and any(
        isinstance(a, fx.Node) and strip_passthroughs(a) is x for a in u.args)), None)
    if normalized is None:
        return None
    nodes, weight_node = [mean.args[0], mean, eps_add, rsqrt, normalized], None
    scope = module_fqn(rsqrt)
    while len(nodes[-1].users) == 1:  # casts and the weight multiply, inside the same module
        user = next(iter(nodes[-1].users))
        if module_fqn(user) != scope:
            break
        if weight_node is None and _is_call(user, ("mul",)):
            other = next((a for a in user.args if a is not nodes[-1]), None)
            candidate = strip_passthroughs(other) if isinstance(other, fx.Node) else None
            if tensors.parameter(candidate) is None:
                break
            weight_node = candidate
        elif passthrough_input(user) is not nodes[-1]:
            break
        nodes.append(user)
    return nodes, weight_node


def _norm_fqn(node: fx.Node, weight_node) -> str:
    fqn = module_fqn(node)
    if not fqn and isinstance(weight_node, fx.Node):  # a functional norm at the root
        fqn = (source_name(weight_node) or weight_node.name).removesuffix(".weight")
    return fqn


def _residual_add(node: fx.Node, linears: dict[fx.Node, LinearSite], position: dict[fx.Node, int],
                  memo: dict[fx.Node, list[LinearSite]]) -> Optional[ResidualAdd]:
    if not _is_call(node, ADD_OPS) or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if not _same_shape(fake_value(a), fake_value(b)):
        return None
    writers = []
    for operand, other in ((a, b), (b, a)):
        sites = _linear_writers(operand, linears, memo)
        stream = strip_passthroughs(other)
        if sites and all(_descends_from(site.x, stream, position) for site in sites):
            writers += sites
    if not writers:
        return None
    return ResidualAdd(node, module_fqn(node), [site.fqn for site in writers])


def _linear_writers(node: fx.Node, linears: dict[fx.Node, LinearSite],
                    memo: dict[fx.Node, list[LinearSite]]) -> list[LinearSite]:
    """The linears whose output `node` is, up to re-layouts, casts, dropout, scaling by a
    constant, and sums of such (LoRA: base_layer(x) + lora_B(lora_A(x)) * scale)."""
    node = strip_passthroughs(node)
    if node in linears:
        return [linears[node]]
    if node in memo:  # the residual stream is a long chain of adds: walk it once
        return memo[node]
    writers = []
    tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
    if _is_call(node, _SCALINGS) and len(tensor_args) == 1 and _has_constant(node):
        writers = _linear_writers(tensor_args[0], linears, memo)
    elif _is_call(node, ADD_OPS) and len(tensor_args) == 2:
        left = _linear_writers(tensor_args[0], linears, memo)
        right = _linear_writers(tensor_args[1], linears, memo) if left else []
        writers = left + right if right else []
    memo[node] = writers
    return writers


def _descends_from(node: fx.Node, ancestor: fx.Node, position: dict[fx.Node, int]) -> bool:
    """Whether `ancestor` is `node` or one of its inputs, transitively. Only nodes computed after
    `ancestor` can lead to it, which keeps the search to about one layer."""
    start = position[ancestor]
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        for source in current.all_input_nodes:
            if source not in seen and position[source] >= start:
                seen.add(source)
                stack.append(source)
    return False


def _is_call(node, names: tuple[str, ...]) -> bool:
    return (isinstance(node, fx.Node) and node.op in ("call_function", "call_method")
            and call_target_name(node) in names)


def _has_constant(node: fx.Node) -> bool:
    return any(isinstance(a, (int, float)) for a in node.args)


def _is_square(node) -> bool:
    if _is_call(node, ("square",)):
        return True
    if _is_call(node, ("pow",)) and len(node.args) == 2:
        return node.args[1] == 2
    return _is_call(node, ("mul",)) and len(node.args) == 2 and node.args[0] is node.args[1]


def _same_shape(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Both tensors, of one shape. Dynamic sizes must be provably equal: adding guards here,
    after Dynamo has captured the graph, would go unchecked."""
    if a is None or b is None or a.dim() != b.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=False))
