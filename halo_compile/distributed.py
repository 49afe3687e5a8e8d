"""halo under PyTorch's own distributed engines: FSDP2 (`fully_shard`) and DDP.

halo adds no communication of its own. Under FSDP2 the compiled graphs read the *unsharded*
parameters FSDP swaps in around each forward/backward, not the sharded DTensor parameters
`model.parameters()` returns; `unsharded_parameters` links the two, so that `configure(model)`
and `report(model)` find a sharded model's graphs.

`enable_fp8_all_gather(model)` makes FSDP2 all-gather each quantized linear's weight in FP8 with
its per-row scales (the forward's Hadamard rotation and quantization run on the local shard,
before the all-gather), through FSDP2's tensor-subclass hooks `fsdp_pre_all_gather` /
`fsdp_post_all_gather`, as torchao.float8 does. `count_all_gather_bytes()` measures what it saves.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree

from halo_compile.backend import configured_options
from halo_compile.config import HaloConfig, LayerConfig
from halo_compile.fsdp_parameters import unsharded_parameters  # noqa: F401  (public here too)
from halo_compile.kernels.constants import FORMATS as QUANT_FORMATS
from halo_compile.kernels.constants import MAX_BLOCK
from halo_compile.kernels.hadamard import block_hadamard, hadamard_block_size, hadamard_signs
from halo_compile.kernels.quantize import dequantize, quantize
from halo_compile.passes.analysis import LinearSite
from halo_compile.passes.quantize_linears import QuantizeLinears

# FSDP pads and moves its local shard with these ops: their results stay all-gather-quantized
# weights (the list torchao.float8's WeightWithDynamicFloat8CastTensor keeps, for the same reason).
_OPS_KEEPING_SUBCLASS = {
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.copy_.default,
    torch.ops.aten.view.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten._pin_memory.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.clone.default,
}


class QuantizedAllGatherWeight(torch.Tensor):
    """A linear's high-precision weight that FSDP2 all-gathers quantized.

    Before the all-gather, each rank rotates its shard along in-features (the forward's inner
    Hadamard, `block` 0: none) and quantizes it with one scale per row; FSDP2 shards dim 0, so
    every row and its scale are local and no amax needs communicating. The all-gather moves the
    1-byte values and the float32 row scales; afterwards the weight is dequantized and rotated
    back (one GEMM with the ±1 Hadamard block, in the compute dtype), so the compiled graph sees
    an ordinary weight, whose re-quantization in the forward lands on the gathered values up to
    that dtype's rounding (the same rows, block and scales). Everything
    else (optimizer, state_dict) sees the high-precision tensor inside.
    """

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, fmt: str, block: int):
        return torch.Tensor._make_wrapper_subclass(
            cls, tensor.size(), strides=tensor.stride(), storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype, layout=tensor.layout, device=tensor.device,
            requires_grad=tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor, fmt: str, block: int):
        self._tensor = tensor
        self._format = fmt
        self._block = block

    def __repr__(self):
        return (f"QuantizedAllGatherWeight(format={self._format}, block={self._block}, "
                f"tensor={self._tensor})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        settings = next(x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, cls))
        settings = (settings._format, settings._block)
        if func is torch.ops.aten.detach.default:
            return cls(args[0]._tensor.detach(), *settings)
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _OPS_KEEPING_SUBCLASS:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, *settings), out)

    def __reduce_ex__(self, protocol):
        # Saved (torch.save, torch.distributed.checkpoint) as the plain high-precision tensor:
        # a checkpoint loads without halo, into any model.
        return self._tensor.__reduce_ex__(protocol)

    def __tensor_flatten__(self):
        return ["_tensor"], (self._format, self._block)

    @staticmethod
    def __tensor_unflatten__(inner_tensors, settings, outer_size, outer_stride):
        return QuantizedAllGatherWeight(inner_tensors["_tensor"], *settings)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        weight = self._tensor
        if self._block <= MAX_BLOCK:  # one fused kernel on CUDA, the reference elsewhere
            values, scales = torch.ops.halo.hadamard_quantize(weight, self._format, "row",
                                                              self._block, 1)
        else:
            values, scales = quantize(block_hadamard(weight, self._block, dim=1),
                                      self._format, "row")
        return (values, scales), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        values, scales = all_gather_outputs
        if self._block:
            # H is symmetric and orthogonal, its own inverse: one GEMM of the exact 8-bit values
            # with the ±1 block, then the row scales and H's 1/sqrt(block).
            rows, cols = values.shape
            signs = hadamard_signs(self._block, param_dtype, values.device)
            weight = torch.matmul(values.to(param_dtype).reshape(-1, self._block), signs)
            weight = weight.reshape(rows, cols) * (scales / math.sqrt(self._block)).to(param_dtype)
        else:
            weight = dequantize(values, scales).to(param_dtype)
        if out is not None:
            # Later all-gathers refill the unsharded parameter in place, as FSDP2's own path
            # does: backward's saved reference to it must stay valid.
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                out.copy_(weight)
            return None
        return weight, (weight,)


def enable_fp8_all_gather(model: nn.Module,
                          options: Union[HaloConfig, Mapping[str, Any], None] = None,
                          world_size: Optional[int] = None) -> list[str]:
    """Make FSDP2 all-gather the weights of `model`'s quantized linears in low precision (FP8
    E4M3, or INT8 for layers configured so) with their row scales. Call it before `fully_shard`,
    with the options the model will be compiled with (default: those given to `configure`).

    A linear the backend leaves in high precision, one with format "none", or one whose rows do
    not split evenly over `world_size` ranks (FSDP2 then pads, and its all-gather extension
    requires every input at the padded shard size) keeps the ordinary all-gather. Returns the
    names of the linears whose weights are now all-gathered quantized.
    """
    config = HaloConfig.from_options(options) if options is not None else (
        configured_options(model) or HaloConfig())
    world_size = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    enabled = []
    for fqn, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or isinstance(weight, QuantizedAllGatherWeight):
            continue
        layer = config.for_layer(fqn)
        site = LinearSite(None, fqn, "linear", None, None, weight, False, None)
        if QuantizeLinears._reason_to_skip(site, layer, SimpleNamespace(config=config)):
            continue
        if layer.format not in QUANT_FORMATS or weight.shape[0] % world_size:
            continue
        module.weight = nn.Parameter(
            QuantizedAllGatherWeight(weight.data, layer.format, _forward_block(layer, weight)),
            requires_grad=weight.requires_grad)
        enabled.append(fqn)
    return enabled


def _forward_block(layer: LayerConfig, weight: torch.Tensor) -> int:
    """The Hadamard block the forward rotates the weight's in-features with (0: unrotated)."""
    if layer.hadamard.forward != "inner":
        return 0
    return hadamard_block_size(weight.shape[1], layer.max_block)


class AllGatherBytes:
    """Bytes this rank sent into all-gathers (`count_all_gather_bytes`)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0


@contextlib.contextmanager
def count_all_gather_bytes() -> Iterator[AllGatherBytes]:
    """Count what this rank puts into `torch.distributed` all-gathers (FSDP2's parameter
    all-gathers: `all_gather_single` in torch >= 2.12, `all_gather_into_tensor` before)."""
    counter = AllGatherBytes()
    originals = {name: getattr(dist, name) for name in ("all_gather_single",
                                                        "all_gather_into_tensor")
                 if hasattr(dist, name)}

    def counting(original):
        def all_gather(output_tensor, input_tensor, *args, **kwargs):
            counter.bytes += input_tensor.numel() * input_tensor.element_size()
            counter.calls += 1
            return original(output_tensor, input_tensor, *args, **kwargs)
        return all_gather

    try:
        for name, original in originals.items():
            setattr(dist, name, counting(original))
        yield counter
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
