"""Transform: replace each selected linear by `halo::quantized_linear`, and report every linear.

A linear stays in high precision, with the reason in the report, when the user excluded it, when
it is below `min_features`, or when its shape, dtype or device is one the low-precision GEMMs
cannot take: never a silently wrong result.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx

from halo_compile.config import LayerConfig
from halo_compile.kernels.constants import EMULATED_FORMATS, MIN_BLOCK
from halo_compile.kernels.emulated_quantized_linear import (  # noqa: F401  (registers op)
    emulated_quantized_linear,
)
from halo_compile.kernels.frozen_linear import frozen_linear  # noqa: F401  (registers op)
from halo_compile.kernels.hadamard import hadamard_block_size, token_block
from halo_compile.kernels.quantized_linear import quantized_linear  # noqa: F401  (registers op)
from halo_compile.kernels.settings import LinearSettings, WeightSource
from halo_compile.kernels.weight_cache import FOLDS, WEIGHT_CACHE, watch_optimizer_steps
from halo_compile.report import LayerReport, MatmulPlan

from .analysis import LinearSite
from .autocast_regions import AUTOCAST_ELIGIBLE, autocast_dtypes
from .folding import FOLD_FUNCTIONS
from .graph_utils import fake_value

_LOG = logging.getLogger(__name__)

GEMM_ALIGNMENT = 16  # FP8 cuBLASLt needs in/out features divisible by 16 (INT8 needs 8)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_DEVICES = ("cpu", "cuda")


class QuantizeLinears:
    name = "quantize_linears"

    def run(self, ctx) -> None:
        inputs = _LinearInputs(ctx.gm.graph, ctx.autocast_at_entry)
        for site in ctx.analysis.linears:
            layer = ctx.config.for_layer(site.fqn)
            forward = ("none" if site.fqn in ctx.fusion.prerotated else  # rotate="fused"
                       "inner" if site.fqn in ctx.fusion.forward_hadamard else None)
            if layer is not None and forward is not None:
                layer = dataclasses.replace(
                    layer, hadamard=dataclasses.replace(layer.hadamard, forward=forward))
            fusion = dict(rotation=ctx.fusion.describe(site.fqn),
                          folded_bytes=ctx.fusion.folded_bytes.get(site.fqn, 0))
            reason = self._reason_to_skip(site, layer, ctx)
            _LOG.debug("%s: %s", site.fqn, f"high precision: {reason}" if reason else layer)
            if reason:
                ctx.layer_reports.append(LayerReport(
                    site.fqn, site.in_features, site.out_features, False, reason=reason, **fusion))
                continue
            site.x = inputs.as_linear_reads_it(site)
            plans = _plan_matmuls(site, layer)
            frozen, weight_cache = self._rewrite(ctx, site, layer,
                                                 ctx.config.nonfinite == "raise")
            ctx.layer_reports.append(LayerReport(
                site.fqn, site.in_features, site.out_features, True, layer.format,
                "row, emulated" if layer.format in EMULATED_FORMATS else layer.scale,
                *plans, frozen=frozen, weight_cache=weight_cache, **fusion,
            ))

    @staticmethod
    def _reason_to_skip(site: LinearSite, layer, ctx) -> str:
        if layer is None:
            return f"excluded by layers[{ctx.config.excluded_by(site.fqn)!r}]"
        if layer.adapters == "high_precision" and _is_lora_adapter(site.fqn):
            return "LoRA adapter (per-layer option adapters='quantize' quantizes it)"
        w = site.weight
        if w.dtype not in SUPPORTED_DTYPES:
            return f"weight dtype {w.dtype} not supported"
        if w.device.type not in SUPPORTED_DEVICES:
            return f"device {w.device.type} not supported"
        x = fake_value(site.x)
        if x is not None and not x.dtype.is_floating_point:
            return f"input dtype {x.dtype} not supported"
        for name, size in (("in_features", site.in_features), ("out_features", site.out_features)):
            if size % GEMM_ALIGNMENT:
                return f"{name}={size} is not a multiple of {GEMM_ALIGNMENT} (GEMM alignment)"
        if min(site.in_features, site.out_features) < layer.min_features:
            return f"smaller than min_features={layer.min_features}"
        return ""

    @staticmethod
    def _rewrite(ctx, site: LinearSite, layer: LayerConfig, check_finite: bool):
        """Replace the linear by its halo op. Returns (whether it took the frozen-weight op,
        the report's word on option cache_weights: "" when not asked for)."""
        graph, node = ctx.gm.graph, site.node
        frozen = None if layer.format in EMULATED_FORMATS else _frozen_weight(site, ctx)
        weight_cache = ""
        with graph.inserting_before(node):
            if frozen is not None:
                # Folded, rotated and quantized once per weight version, not per call. Drop what
                # an earlier compilation cached: the weight may have been edited through `.data`
                # (peft's merge does that), which its version counter does not see.
                WEIGHT_CACHE.forget([site.weight])
                param_node, fold, fold_inputs, fold_nodes = frozen
                source = WeightSource(fold, site.weight_transposed)
                new = graph.call_function(
                    torch.ops.halo.frozen_linear.default,
                    (site.x, param_node, fold_inputs, site.bias, source.encoded,
                     _linear_settings(layer, ctx.name_in_errors(site.fqn), check_finite).encoded),
                )
                node.replace_input_with(site.weight_node, param_node)
                for fold_node in fold_nodes:  # in the cache now, not computed per call
                    if not fold_node.users:
                        graph.erase_node(fold_node)
                site.weight_node = param_node
            else:
                weight = site.weight_node
                if site.weight_transposed:
                    weight = graph.call_method("t", (weight,))
                if layer.format in EMULATED_FORMATS:  # 4-bit: inference, plain-torch emulation
                    settings = _linear_settings(layer, ctx.name_in_errors(site.fqn), check_finite)
                    new = graph.call_function(
                        torch.ops.halo.emulated_quantized_linear.default,
                        (site.x, weight, site.bias, settings.encoded),
                    )
                else:
                    weight_cache = _weight_cache(site, layer, ctx)
                    settings = _linear_settings(layer, ctx.name_in_errors(site.fqn), check_finite,
                                                cache_weight=weight_cache == "cached")
                    new = graph.call_function(
                        torch.ops.halo.quantized_linear.default,
                        (site.x, weight, site.bias, settings.encoded),
                    )
        new.meta.update(node.meta)
        ctx.replace_node(node, new)  # a linear reading this one's output now reads the halo op
        graph.erase_node(node)
        return frozen is not None, weight_cache


def _linear_settings(layer: LayerConfig, name: str, check_finite: bool,
                     cache_weight: bool = False) -> LinearSettings:
    """What the halo op of the linear `name` takes, from its layer options."""
    return LinearSettings(
        format=layer.format, granularity=layer.scale, forward_rotation=layer.hadamard.forward,
        grad_input_rotation=layer.hadamard.grad_input,
        grad_weight_rotation=layer.hadamard.grad_weight, max_block=layer.max_block,
        grad_rounding=layer.grad_rounding, check_finite=check_finite, name=name,
        fast_accum=layer.fast_accum, cache_weight=cache_weight)


class _LinearInputs:
    """A linear's input as `F.linear` reads it: under autocast, cast to the autocast dtype (halo's
    ops compute in their input's dtype, and autocast does not cast custom ops); outside it, the
    input itself, whose dtype must be the weight's, as eager requires. One cast per activation
    and dtype, so that linears reading one activation still share its quantization."""

    def __init__(self, graph: fx.Graph, autocast_at_entry):
        self.graph = graph
        self.autocast_at_entry = autocast_at_entry
        self.autocast: dict[str, dict] = {}  # device type -> node -> autocast dtype
        self.casts: dict[tuple, fx.Node] = {}

    def as_linear_reads_it(self, site: LinearSite) -> fx.Node:
        x = fake_value(site.x)
        if x is None:
            return site.x
        device = site.weight.device.type
        if device not in self.autocast:
            self.autocast[device] = autocast_dtypes(self.graph, device,
                                                    self.autocast_at_entry(device))
        dtype = self.autocast[device].get(site.node)
        if dtype is not None and x.dtype in AUTOCAST_ELIGIBLE:
            if x.dtype == dtype:
                return site.x
            if (site.x, dtype) not in self.casts:
                with self.graph.inserting_after(site.x):
                    cast = self.graph.call_method("to", (site.x, dtype))
                cast.meta["example_value"] = x.to(dtype)
                self.casts[site.x, dtype] = cast
            return self.casts[site.x, dtype]
        if x.dtype != site.weight.dtype:
            raise RuntimeError(f"{site.fqn}: mat1 and mat2 must have the same dtype, but got "
                               f"{x.dtype} and {site.weight.dtype} (F.linear refuses them too)")
        return site.x


def _weight_cache(site: LinearSite, layer: LayerConfig, ctx) -> str:
    """Whether a trained weight's quantized forms are cached per version (option
    cache_weights): "cached", "" when not asked for, else "not cached: <why>". The cache keys on
    the parameter itself, so the op must read it, not a tensor the graph computes from it."""
    if not layer.cache_weights:
        return ""
    if site.weight_transposed:
        return "not cached: stored [in, out] (as GPT-2's Conv1D); the graph reads its transpose"
    if ctx.tensors.parameter(site.weight_node) is not site.weight:
        return "not cached: the graph computes the weight from the parameter"
    watch_optimizer_steps()  # fused optimizers' writes leave the version counter as it was
    return "cached"


@dataclasses.dataclass(frozen=True)
class _FoldInput:
    index: int


def _frozen_weight(site: LinearSite, ctx):
    """For a weight that gets no gradient (a PEFT base layer, an inference model; Dynamo guards
    on requires_grad, so a weight unfrozen later recompiles into the trained-weight path):
    (its parameter node, the fold key, the fold input nodes, the fold nodes). Under
    rotate="fused" the graph computes the weight from the parameter through fold functions
    (passes/folding.py), which may read other frozen parameters (an RMSNorm's scale); that chain
    is registered in `FOLDS` and the frozen op applies it inside the cache. None when the
    weight or anything the chain reads requires grad, or the chain is not one of folds."""
    chain, node = [], site.weight_node
    while node.op == "call_function" and node.target in FOLD_FUNCTIONS and not node.kwargs:
        chain.append(node)
        node = node.args[0]
    leaves = [arg for step in chain for arg in step.args[1:] if isinstance(arg, fx.Node)]
    params = [ctx.tensors.parameter(n) for n in (node, *leaves)]
    if any(p is None or p.requires_grad for p in params) or params[0] is not site.weight:
        return None
    if not chain:
        return node, "", [], []
    # Each step's arguments after the weight: a constant, or the index of a fold input. No graph
    # node is kept: the registry outlives the graph it was compiled from.
    steps = [(step.target, [_FoldInput(leaves.index(a)) if isinstance(a, fx.Node) else a
                            for a in step.args[1:]]) for step in reversed(chain)]

    def fold(weight, *inputs):
        for fn, args in steps:
            weight = fn(weight, *(inputs[a.index] if isinstance(a, _FoldInput) else a
                                  for a in args))
        return weight

    return node, FOLDS.register(fold), leaves, chain


def _is_lora_adapter(fqn: str) -> bool:
    """peft names LoRA's linears `<layer>.lora_A.<adapter>` and `<layer>.lora_B.<adapter>`."""
    return any(part in ("lora_A", "lora_B") for part in fqn.split("."))


def _plan_matmuls(site: LinearSite, layer: LayerConfig):
    """The rotation of each matmul and its block along the rotated dimension, as the kernels
    will choose it (kernels/hadamard.py: hadamard_block_size along features; token_block along
    the rows an "outer" rotation pads, and along grad-weight's tokens)."""
    # The rotated dimension of each matmul for each placement (see kernels/scaled_matmul.py).
    rotated_dim = {
        "forward": {"inner": "in", "outer": "tokens"},
        "grad_input": {"inner": "out", "outer": "tokens"},
        "grad_weight": {"inner": "tokens", "outer": "out"},
    }
    features = {"in": site.in_features, "out": site.out_features}
    plans = []
    for matmul, dims in rotated_dim.items():
        rotation = getattr(layer.hadamard, matmul)
        if rotation == "none":
            plans.append(MatmulPlan("none"))
            continue
        dim = dims[rotation]
        if rotation == "outer" or dim == "tokens":  # any count: padded to the block
            block = token_block(layer.max_block)
            plans.append(MatmulPlan(rotation, dim, block, f"{dim} padded to a multiple"
                                    if dim != "tokens" and features[dim] % block else ""))
            continue
        size = features[dim]
        block = hadamard_block_size(size, layer.max_block)
        note = "" if block else f"no power-of-two block >= {MIN_BLOCK} divides {dim}={size}"
        plans.append(MatmulPlan(rotation, dim, block, note))
    return plans
