"""The `halo` torch.compile backend: halo's FX passes on the Dynamo graph, then AOTAutograd and
Inductor (or aot_eager) exactly as the default backend would run them."""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Optional, Union

import torch

from halo_compile.config import HaloConfig
from halo_compile.passes.graph_utils import GraphTensors
from halo_compile.passes.manager import PassManager
from halo_compile.report import GraphRecord, record_graph

# id(parameter) -> (weak reference to it, config). Not a WeakKeyDictionary: that compares keys
# with Tensor.__eq__ (elementwise), which fails for any parameter configured or looked up twice.
_CONFIGURED: "dict[int, tuple[weakref.ref, HaloConfig]]" = {}


def _forget(key: int, ref: weakref.ref) -> None:
    if _CONFIGURED.get(key, (None,))[0] is ref:
        del _CONFIGURED[key]


def configure(model: torch.nn.Module, options: Union[HaloConfig, Mapping[str, Any], None] = None,
              **kwargs) -> HaloConfig:
    """Attach halo options to a model, for when `torch.compile` is called elsewhere (a trainer)
    without `options=`. Options given to `torch.compile` itself take precedence."""
    if options is not None and kwargs:
        raise ValueError("pass halo options either as a dict/HaloConfig or as keywords, not both")
    config = HaloConfig.from_options(options if options is not None else kwargs)
    for param in model.parameters():
        key = id(param)
        _CONFIGURED[key] = (weakref.ref(param, lambda ref, key=key: _forget(key, ref)), config)
    return config


def _configured_for(tensors: GraphTensors) -> Optional[HaloConfig]:
    for param in tensors.parameters():
        ref, config = _CONFIGURED.get(id(param), (None, None))
        if ref is not None and ref() is param:
            return config
    return None


def halo_backend(gm: torch.fx.GraphModule, example_inputs, options=None):
    """torch.compile(model, backend="halo", options={...}) lands here for each Dynamo graph."""
    if options is not None:
        config = HaloConfig.from_options(options)
    tensors = GraphTensors(gm, example_inputs)
    if options is None:
        config = _configured_for(tensors) or HaloConfig()
    ctx = PassManager().run(gm, example_inputs, config)
    record = GraphRecord(ctx.layer_reports, ctx.analysis.describe())
    record.add_parameters(tensors.parameters())
    record_graph(record)
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
