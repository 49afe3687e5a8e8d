"""Helpers the passes share to read a Dynamo FX graph: module names and parameters."""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.fx as fx

_ROOT = re.compile(r"^[LG]\['[^']*'\]\.?")
_GETATTR = re.compile(r"getattr\(([^(),]+), '([^']+)'\)")
_ATTRIBUTE_DICT = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")
_INDEX = re.compile(r"\[(\d+)\]")


def normalize_module_path(path: str) -> str:
    """Dynamo's module path ("L['self'].model.layers[0].mlp") -> FQN ("model.layers.0.mlp")."""
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = _ATTRIBUTE_DICT.sub(r".\1", path)
    path = _INDEX.sub(r".\1", path)
    return _ROOT.sub("", path)


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
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs):
            self._values[node] = value
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self._values[node] = _resolve_attr(gm, node.target)

    def parameter(self, node) -> Optional[torch.nn.Parameter]:
        value = self._values.get(node) if isinstance(node, fx.Node) else None
        return value if isinstance(value, torch.nn.Parameter) else None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [v for v in self._values.values() if isinstance(v, torch.nn.Parameter)]


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
