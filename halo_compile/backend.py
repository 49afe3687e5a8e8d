"""The `halo` torch.compile backend: halo's FX passes on the Dynamo graph, then AOTAutograd and
Inductor (or aot_eager) as the default backend would run them, with post-grad passes of ours
in Inductor (passes/post_grad.py) and halo's patches of Dynamo and Inductor
(halo_compile/inductor_patches.py)."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Mapping, Optional, Union

import torch

from halo_compile import fallbacks, inductor_patches
from halo_compile.config import HaloConfig, config_from_call
from halo_compile.fsdp_parameters import unsharded_parameters
from halo_compile.kernels.quantize import HOST_SIDE_TAGS
from halo_compile.passes.graph_utils import GraphTensors
from halo_compile.passes.manager import PassManager
from halo_compile.passes.post_grad import HaloPostGradPasses
from halo_compile.report import GraphRecord, record_graph, region_of

_LOG = logging.getLogger(__name__)

# Configured modules and their options. Looked up through their parameters at compile time, and
# through FSDP2's unsharded parameters: fully_shard replaces a module's parameters by sharded
# ones and swaps unsharded ones in around forward, and the graphs read those.
_CONFIGURED: "weakref.WeakKeyDictionary[torch.nn.Module, HaloConfig]" = weakref.WeakKeyDictionary()


def configure(model: torch.nn.Module, options: Union[HaloConfig, Mapping[str, Any], None] = None,
              **kwargs) -> HaloConfig:
    """Attach halo options to a model, for when `torch.compile` is called elsewhere (a trainer)
    without `options=`. Options given to `torch.compile` itself take precedence. Checks the
    `layers` globs against the model's linears (halo_compile/fallbacks.py)."""
    config = config_from_call(options, kwargs)
    fallbacks.check_model_layer_globs(model, config)
    _CONFIGURED.pop(model, None)  # the latest configure() call wins: keep insertion order
    _CONFIGURED[model] = config
    return config


def configured_options(model: torch.nn.Module) -> Optional[HaloConfig]:
    """The options `configure(model, ...)` attached to `model`, if any."""
    return _CONFIGURED.get(model)


def _configured_for(tensors: GraphTensors) -> Optional[HaloConfig]:
    graph_params = {id(p) for p in tensors.parameters()}  # alive: ids are unique
    for module, config in reversed(list(_CONFIGURED.items())):
        if any(id(p) in graph_params
               for p in (*module.parameters(), *unsharded_parameters(module))):
            return config
    return None


inductor_patches.apply_on_load()


# torch.compile's `mode` for this backend (it takes `mode` or `options`, not both): Inductor's
# modes, over the configured (or default) options. Their CUDA graphs are halo's `cudagraphs`
# option (which keeps the ops with host-side work out of the graphs); their other Inductor
# settings pass through (max-autotune: Triton GEMM templates, `_scaled_mm`'s among them, chosen
# by measuring them against the library calls).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def halo_backend(gm: torch.fx.GraphModule, example_inputs, options=None, mode=None):
    """torch.compile(model, backend="halo", options={...}) lands here for each Dynamo graph;
    torch.compile(model, backend="halo", mode=...) is the configured (or default) options with
    the mode's Inductor settings: "reduce-overhead" is option {"cudagraphs": True},
    "max-autotune-no-cudagraphs" Inductor's autotuning, "max-autotune" both."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"halo backend: unsupported mode {mode!r}; allowed: {MODES} "
                         "(other Inductor settings are not halo options)")
    if options is not None:
        config = HaloConfig.from_options(options)
    tensors = GraphTensors(gm, example_inputs)
    if options is None:
        config = _configured_for(tensors) or HaloConfig()
    if mode in _CUDA_GRAPH_MODES:
        config = dataclasses.replace(config, cudagraphs=True)
    # Recorded before the passes run: a compilation that fails (and that suppress_errors turns
    # into eager execution) still leaves its frame's record (halo_compile/fallbacks.py).
    source = fallbacks.frame_module()  # the layers' names are relative to it
    record = GraphRecord([], [], frame=fallbacks.current_frame(), config=config, finished=False,
                         module=weakref.ref(source) if source is not None else None)
    record.add_parameters(tensors.parameters())
    record_graph(record)
    region = region_of(source)  # compiled regionally: the graph may serve other blocks too
    ctx = PassManager().run(gm, example_inputs, config,
                            name_in_errors=region.name_in_errors if region is not None else None)
    record.layers = ctx.layer_reports
    _LOG.info("graph compiled: %d linears quantized, %d in high precision",
              sum(layer.quantized for layer in record.layers),
              sum(not layer.quantized for layer in record.layers))
    record.structure = ctx.describe()
    record.finished = True
    fallbacks.check_graph_layer_globs(record)
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    # Un-rotated gradients summed before one un-rotation; one inf/NaN report per compiled
    # graph instead of a Python op call per quantized matmul.
    post_grad = HaloPostGradPasses(then=inductor_config.post_grad_custom_post_pass,
                                   copy_scales=config.cudagraphs)
    patches = {"post_grad_custom_post_pass": post_grad, **inductor_patches.apply()}
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        patches.update({key: value for key, value in list_mode_options(mode).items()
                        if key != "triton.cudagraphs"})
    if config.cudagraphs:
        # The ops with host-side work (the report, opaque quantized matmuls) are tagged
        # cudagraph-unsafe: graph partitioning runs them eagerly between the graphs' replays.
        if not HOST_SIDE_TAGS or not hasattr(inductor_config, "graph_partition"):
            raise ValueError(f"halo option 'cudagraphs' needs Inductor's graph partitioning "
                             f"and torch.Tag.cudagraph_unsafe, which torch {torch.__version__} "
                             "lacks")
        patches.update({"triton.cudagraphs": True, "graph_partition": True})
    return compile_fx(gm, example_inputs, config_patches=patches)
