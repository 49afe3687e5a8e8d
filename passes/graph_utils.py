"""Helpers the passes share to read a Dynamo FX graph: module names and parameters."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from .analysis import LinearSite

# The root module: `L['self']`, or `L['args'][0]` when forward is wrapped by a `*args` decorator.
_ROOT = re.compile(r"^[LG]\[(?:'args'\]\[0|'[^']*')\]\.?")
_GETATTR = re.compile(r"getattr\(([^(),]+), '([^']+)'\)")
_ATTRIBUTE_DICT = re.compile(
    r"(?:^|\.)(?:__dict__\['_modules'\]|_modules|_parameters|_buffers)\['([^']+)'\]"
)  # also peft's `self.__dict__['_modules']['base_model']`
_INDEX = re.compile(r"\['?([^'\]]+)'?\]")  # Sequential/ModuleList [0], ModuleDict ['default']


def normalize_module_path(path: str) -> str:
    """Dynamo's module path ("L['self'].model.layers[0].mlp") -> FQN ("model.layers.0.mlp")."""
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = _ROOT.sub("", path)
    path = _ATTRIBUTE_DICT.sub(r".\1", path)
    return _INDEX.sub(r".\1", path).lstrip(".")


def module_fqn(node: fx.Node) -> str:
    """FQN of the innermost module that produced `node` ("" at the root or when unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_module_path(path)


def module_type(node: fx.Node) -> Optional[type]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    module_cls = list(stack.values())[-1][1]
    return module_cls if isinstance(module_cls, type) else None


def source_name(node: fx.Node) -> Optional[str]:
    """The user-side name of a graph input ("lm_head.weight"), from Dynamo's source."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name  # a property in torch 2.13, a method in 2.11
    return normalize_module_path(name() if callable(name) else name)


class GraphTensors:
    """Maps placeholder and get_attr nodes to the real tensors behind them (the parameters)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence):
        self._values: dict[fx.Node, object] = {}
        self._sources: dict[fx.Node, str] = {}  # subgraph placeholders: the outer input's name
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs, strict=False):
            recorded = _dynamo_example(node)
            self._values[node] = recorded if isinstance(recorded, torch.nn.Parameter) else value
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self._values[node] = _resolve_attr(gm, node.target)

    @classmethod
    def for_subgraph(cls, body: fx.GraphModule, outer: "GraphTensors",
                     operands: Mapping[fx.Node, fx.Node]) -> "GraphTensors":
        """The tensors of a higher-order op's subgraph: each placeholder stands for the outer
        graph's node the op passes in its place (`operands`: placeholder -> outer node), so a
        weight read inside the subgraph resolves to the real parameter, and its user-side name
        is the outer input's."""
        tensors = cls(body, ())
        for inner, outer_node in operands.items():
            if outer_node in outer._values:
                tensors._values[inner] = outer._values[outer_node]
            name = outer.source_name(outer_node)
            if name:
                tensors._sources[inner] = name
        return tensors

    def source_name(self, node) -> Optional[str]:
        """The user-side name of a graph input ("lm_head.weight"), in a subgraph that of the
        outer input it stands for."""
        if not isinstance(node, fx.Node):
            return None
        return self._sources.get(node) or source_name(node)

    def parameter(self, node) -> Optional[torch.nn.Parameter]:
        value = self._values.get(node) if isinstance(node, fx.Node) else None
        return value if isinstance(value, torch.nn.Parameter) else None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [v for v in self._values.values() if isinstance(v, torch.nn.Parameter)]


def _dynamo_example(node: fx.Node):
    """The real tensor Dynamo recorded for a graph input. The DDP optimizer hands each bucket's
    subgraph fake example inputs (fake parameters still pass isinstance(_, Parameter)); its
    placeholders keep Dynamo's record of the real parameter."""
    grapharg = node.meta.get("grapharg")
    try:
        return getattr(grapharg, "example", None)
    except AssertionError:  # the tensor behind the record was freed
        return None


def _resolve_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def fake_value(node) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo recorded for a node's output, if it is a tensor."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def call_target_name(node: fx.Node) -> str:
    """A short name for what a node calls: "linear", "add", "transpose", ..."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def node_arg(node: fx.Node, index: int, name: str):
    """A call's argument given either positionally at `index` or by keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


# Ops that hand on one tensor's values unchanged up to layout, dtype or dropout.
_PASSTHROUGH_OPS = frozenset({
    "view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "squeeze",
    "unsqueeze", "expand", "getitem", "view_as", "reshape_as", "expand_as", "clone",
    "to", "type", "type_as", "float", "half", "bfloat16", "double",
    "dropout",
})


def passthrough_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor that `node` only re-lays out, casts or drops out; None for any other op."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    if call_target_name(node) not in _PASSTHROUGH_OPS:
        return None
    source = node.args[0]
    return source if fake_value(source) is not None else None  # not getitem of a tuple


def strip_passthroughs(node: fx.Node) -> fx.Node:
    """Walk back through re-layouts, casts and dropout to the node that computed the values."""
    while (source := passthrough_input(node)) is not None:
        node = source
    return node


def passthrough_descendants(node: fx.Node) -> Iterator[fx.Node]:
    """`node` and every node reached from it through re-layouts, casts and dropout only."""
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        yield current
        for user in current.users:
            if user not in seen and passthrough_input(user) is current:
                seen.add(user)
                stack.append(user)


def linears_reading(node: fx.Node, linears: Mapping[fx.Node, LinearSite]) -> list[LinearSite]:
    """The linears whose input is `node` or a re-layout, cast or dropout of it."""
    return [linears[user] for source in passthrough_descendants(node) for user in source.users
            if user in linears and linears[user].x is source]


def program_order(graph: fx.Graph) -> dict[fx.Node, int]:
    """Each node's index in the graph, to compare nodes by when they are computed."""
    return {node: i for i, node in enumerate(graph.nodes)}
