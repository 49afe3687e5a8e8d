"""The `halo` torch.compile backend: halo's FX passes on the Dynamo graph, then AOTAutograd and
Inductor (or aot_eager) as the default backend would run them, with post-grad passes of ours
in Inductor (passes/post_grad.py), two Inductor settings for halo's Triton
kernels (`_realize_user_kernel_inputs`, `_static_launch`; docs/design.md) and a lowering that
keeps Inductor from reusing the weight cache's tensors (`_never_reuse_cached_weights`)."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Mapping, Optional, Union

import torch

from halo_compile import fallbacks
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


def _trace_checkpointed_regions() -> None:
    """Let Dynamo trace a checkpointed region (torch.utils.checkpoint in either reentrant mode,
    Hugging Face's gradient checkpointing) whose forward writes Python state from outside the
    region. Without this Dynamo runs the whole region eagerly, so halo never sees its linears;
    Hugging Face's attention layers write such state (transformers' `kernels` hub wrapper sets a
    context variable and resets it on return: no net effect). With it, Dynamo applies such a write
    once, in the forward, and the backward's recomputation of the region does not repeat it (as
    eager checkpointing would). A process-wide Dynamo setting, set when halo is loaded: set it
    back to False to keep such regions eager. A torch without the setting is left as it is
    (the regions' linears then show in the report only if Dynamo traces them)."""
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        _LOG.debug("set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint")


_trace_checkpointed_regions()


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

    _realize_user_kernel_inputs()
    _never_reuse_cached_weights()
    # Un-rotated gradients summed before one un-rotation; one inf/NaN report per compiled
    # graph instead of a Python op call per quantized matmul.
    post_grad = HaloPostGradPasses(then=inductor_config.post_grad_custom_post_pass,
                                   copy_scales=config.cudagraphs)
    patches = {"post_grad_custom_post_pass": post_grad, **_static_launch(inductor_config)}
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


def _realize_user_kernel_inputs() -> None:
    """Have Inductor compute an input of a user-defined Triton kernel (halo's quantize kernels)
    into a buffer of its own when it has several users, as it does for the inputs of a matmul.
    Otherwise an elementwise result (the SiLU-gate product and its gradients) stays unrealized,
    and each kernel launch that reads it gets a copy of its own: Inductor holds a user kernel's
    inputs to their traced strides and copies an unrealized input for every launch
    (ExternKernel.require_exact_strides -> copy_input), so a decoder layer's SiLU-gate kernels
    stored their product 3 times in the forward and each of its gradients 4 times in the
    backward. The set is Inductor's own (lowering.needs_realized_inputs, in torch 2.11-2.13; a
    torch without it is left as it is); adding to it once is enough."""
    from torch._inductor import lowering

    needs_realized = getattr(lowering, "needs_realized_inputs", None)
    if needs_realized is not None:
        needs_realized.add(torch.ops.higher_order.triton_kernel_wrapper_mutation)


def _never_reuse_cached_weights() -> None:
    """Keep Inductor from reusing the buffers of `halo::cached_quantized_weight`'s outputs: they
    are the weight cache's own tensors, returned on every call, and Inductor writes later
    results into a dead buffer of the right size (or a pointwise result into its dead input) --
    which would overwrite the cache. The op's lowering is its fallback call with its outputs
    added to the graph's never_reuse_buffers (what Inductor itself does for while_loop outputs
    that may be graph inputs). Registered once."""
    from torch._inductor import lowering
    from torch._inductor.virtualized import V

    op = torch.ops.halo.cached_quantized_weight.default
    if op in lowering.lowerings:
        return
    fallback = lowering.fallback_handler(op, add_to_fallback_set=False)

    def lower(*args, **kwargs):
        outputs = fallback(*args, **kwargs)
        for output in outputs:
            V.graph.never_reuse_buffers.add(output.get_name())
        return outputs

    lowering.register_lowering(op, type_promotion_kind=None)(lower)


def _static_launch(inductor_config) -> dict:
    """The Inductor setting that launches halo's Triton kernels as Inductor launches its own,
    through its static CUDA launcher instead of Triton's Python launcher (less host time per
    launch, and a decoder layer's step makes dozens), where this torch has it and uses that
    launcher (torch leaves it off for user-defined kernels by default)."""
    if getattr(inductor_config, "use_static_cuda_launcher", False) and hasattr(
            inductor_config, "static_launch_user_defined_triton_kernels"):
        return {"static_launch_user_defined_triton_kernels": True}
    return {}
