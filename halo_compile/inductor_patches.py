"""What halo changes in Dynamo and Inductor, and why: each patch in one function that says what
it relies on upstream, changes nothing when applied again, and logs at DEBUG when it changes
something. docs/design.md ("Inductor settings for halo's kernels") has the measurements.

* `apply_on_load()`, once, when halo is loaded (Dynamo reads its setting while it traces, before
  any backend is called): `trace_checkpointed_regions`, a process-wide Dynamo setting.
* `apply()`, before each graph halo hands to Inductor: `realize_user_kernel_inputs` and
  `never_reuse_cached_weights` (process-wide, idempotent), and the Inductor config patches of
  that graph alone (`static_launch_config`), which it returns.

Scope: the static launch is a config patch of halo's graphs only, and the lowering applies to
halo's own op only. The other two are process-wide: Dynamo's setting is read before halo sees
a graph, and Inductor's set of ops with realized inputs holds ops, not kernels (every
user-defined Triton kernel's launch is the same higher-order op).

Benchmarks turn the first and the static launch off through halo_compile/_flags.py.
"""

from __future__ import annotations

import logging

import torch

from halo_compile import _flags

_LOG = logging.getLogger(__name__)


def trace_checkpointed_regions() -> None:
    """Let Dynamo trace a checkpointed region (torch.utils.checkpoint in either reentrant mode,
    Hugging Face's gradient checkpointing) whose forward writes Python state from outside the
    region. Without this Dynamo runs the whole region eagerly, so halo never sees its linears;
    Hugging Face's attention layers write such state (transformers' `kernels` hub wrapper sets a
    context variable and resets it on return: no net effect). With it, Dynamo applies such a
    write once, in the forward, and the backward's recomputation of the region does not repeat
    it (as eager checkpointing would). Set when halo is loaded, not again: set it back to False
    to keep such regions eager. A torch without the setting is left as it is (the regions'
    linears then show in the report only if Dynamo traces them).

    Upstream: `skip_fwd_side_effects_in_bwd_under_checkpoint` in
    https://github.com/pytorch/pytorch/blob/main/torch/_dynamo/config.py"""
    config = torch._dynamo.config
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        _LOG.debug("set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint")


def realize_user_kernel_inputs() -> None:
    """Have Inductor compute an input of a user-defined Triton kernel (halo's quantize kernels)
    into a buffer of its own when it has several users, as it does for the inputs of a matmul.
    Otherwise an elementwise result (the SiLU-gate product and its gradients) stays unrealized,
    and each kernel launch that reads it gets a copy of its own: Inductor holds a user kernel's
    inputs to their traced strides and copies an unrealized input for every launch
    (ExternKernel.require_exact_strides -> copy_input), so a decoder layer's SiLU-gate kernels
    stored their product 3 times in the forward and each of its gradients 4 times in the
    backward. A torch without the set is left as it is.

    Upstream: `needs_realized_inputs` in
    https://github.com/pytorch/pytorch/blob/main/torch/_inductor/lowering.py, read by
    GraphLowering when it lowers a node's users (torch/_inductor/graph.py; torch 2.11-2.13);
    `triton_kernel_wrapper_mutation`, the node a user kernel's launch becomes, in
    torch/_higher_order_ops/triton_kernel_wrap.py."""
    from torch._inductor import lowering

    needs_realized = getattr(lowering, "needs_realized_inputs", None)
    op = torch.ops.higher_order.triton_kernel_wrapper_mutation
    if needs_realized is not None and op not in needs_realized:
        needs_realized.add(op)
        _LOG.debug("added triton_kernel_wrapper_mutation to Inductor's needs_realized_inputs")


def never_reuse_cached_weights() -> None:
    """Keep Inductor from reusing the buffers of `halo::cached_quantized_weight`'s outputs: they
    are the weight cache's own tensors, returned on every call, and Inductor writes later
    results into a dead buffer of the right size (or a pointwise result into its dead input) --
    which would overwrite the cache. The op's lowering is its fallback call with its outputs
    added to the graph's never_reuse_buffers (what Inductor itself does for while_loop outputs
    that may be graph inputs). Registered once: a lowering of halo's op only.

    Upstream: `fallback_handler`, `register_lowering` and `lowerings` in
    https://github.com/pytorch/pytorch/blob/main/torch/_inductor/lowering.py;
    `GraphLowering.never_reuse_buffers` in torch/_inductor/graph.py."""
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
    _LOG.debug("registered the lowering of halo::cached_quantized_weight")


def static_launch_config(inductor_config) -> dict:
    """The Inductor config patch that launches halo's Triton kernels as Inductor launches its
    own, through its static CUDA launcher instead of Triton's Python launcher (less host time
    per launch, and a decoder layer's step makes dozens), where this torch has it and uses that
    launcher (torch leaves it off for user-defined kernels by default). A kernel the static
    launcher cannot take falls back to Triton's launcher (Inductor decides per kernel).

    Upstream: `use_static_cuda_launcher` and `static_launch_user_defined_triton_kernels` in
    https://github.com/pytorch/pytorch/blob/main/torch/_inductor/config.py"""
    if getattr(inductor_config, "use_static_cuda_launcher", False) and hasattr(
            inductor_config, "static_launch_user_defined_triton_kernels"):
        return {"static_launch_user_defined_triton_kernels": True}
    return {}


def apply_on_load() -> None:
    """The patches that must be in place before Dynamo traces anything."""
    trace_checkpointed_regions()


def apply() -> dict:
    """The patches for a graph halo hands to Inductor: the process-wide ones not yet applied,
    and the returned Inductor config patches of this graph."""
    from torch._inductor import config as inductor_config

    if _flags.realize_user_kernel_inputs:
        realize_user_kernel_inputs()
    never_reuse_cached_weights()
    patches = static_launch_config(inductor_config) if _flags.static_launch else {}
    if patches:
        _LOG.debug("Inductor config patches for halo's kernels: %s", patches)
    return patches
