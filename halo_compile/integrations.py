"""Training with halo under frameworks that own the training loop: the Hugging Face Trainer.

`TrainingArguments(torch_compile=True, torch_compile_backend="halo")` does not work: accelerate's
dynamo plugin accepts only its own enum of backend names ("'HALO' is not a valid
DynamoBackend"). Instead the model is compiled *in place* (`nn.Module.compile`: the module's
`__call__` goes through `torch.compile`, the module object stays what it was). So the Trainer
keeps seeing the model it was given:

- saving: `save_model` / checkpoints write the model's own `state_dict` keys (no `_orig_mod.`
  prefix, as a `torch.compile(model)` wrapper would add), and `from_pretrained` loads them into a
  plain model; a PEFT model saves its adapters as usual;
- evaluation: `model.eval()` under `no_grad` compiles one more graph (a forward-only one);
- gradient accumulation and the loss normalisation (`num_items_in_batch`) are the Trainer's own;
  they cause no recompilation.

    from halo_compile.integrations import HaloCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[HaloCallback({"format": "fp8_e4m3", "hadamard": "halo2"})])

`compile_in_place(model, options)` does the same outside the Trainer (a plain loop, a PyTorch
Lightning module's `configure_model`).

Regional compilation (the default where it is correct). A model whose repeated blocks (the
children of an `nn.ModuleList`, all of one class: `model.layers.*`, BERT's `encoder.layer.*`,
GPT-2's `transformer.h.*`) hold its linears is not compiled as one graph: each block is compiled
in place (`block.compile`), so Dynamo traces the blocks' code once and every block runs that
graph (params are graph inputs, not guarded on), and each module outside the blocks that holds
a linear (`lm_head`, an MLM head, a pooler) is compiled in place too. Compile time is then that
of one block, not of all of them. The whole model is compiled as one graph instead when
`rotate="fused"` (its residual-stream rotation spans the whole graph), when the model has no
repeated blocks, when a module outside the blocks uses a 2-D parameter itself (its forward would
run uncompiled), or when the `layers` globs treat the blocks differently; `regional=` decides
explicitly. A Hugging Face KV cache makes each block's graph guard on its layer index (one graph
per block, then the recompile limit): a regionally compiled model's blocks' parent is called
with `use_cache=False` unless the caller passes `use_cache` or `past_key_values` (training does
not use the cache; `generate()` passes it).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
from typing import Any, Mapping, Optional, Union

import torch
from transformers import TrainerCallback

from halo_compile import fallbacks
from halo_compile.config import LAYER_KEYS, HaloConfig, config_from_call
from halo_compile.report import register_region

_LOG = logging.getLogger(__name__)


def compile_in_place(model: torch.nn.Module,
                     options: Union[HaloConfig, Mapping[str, Any], None] = None,
                     *, regional: Optional[bool] = None, **kwargs) -> torch.nn.Module:
    """Compile `model` with backend="halo" in place and return it. Options are validated now, so
    a typo fails here rather than at the first training step, and `layers` globs are checked
    against the model's linears (halo_compile/fallbacks.py).

    `regional`: compile each repeated block and each module outside the blocks that holds a
    linear on its own (True), the whole model as one graph (False), or regionally where that is
    correct (None; the module docstring says when). The decision is logged at INFO level."""
    config = config_from_call(options, kwargs)  # validated now
    fallbacks.check_model_layer_globs(model, config)
    plan = RegionalPlan.of(model, config)
    if regional is None:
        regional = plan.why_not is None
    elif regional and plan.why_not is not None:
        raise ValueError(f"halo: cannot compile {type(model).__name__} regionally: "
                         f"{plan.why_not}")
    if not regional:
        _LOG.info("halo: compiling %s as one graph (%s)", type(model).__name__,
                  plan.why_not or "regional=False")
        model.compile(backend="halo", options=config)
        return model
    plan.compile(config)
    _LOG.info("halo: compiling %s regionally: %s compiled once for all %d blocks; %s compiled "
              "on their own", type(model).__name__, plan.block_pattern, len(plan.blocks),
              ", ".join(name for name, _ in plan.outside) or "no module outside the blocks")
    return model


@dataclasses.dataclass
class RegionalPlan:
    """What regional compilation of a model compiles: its repeated blocks and the modules
    outside them that hold linears, or why the model must be compiled as one graph."""

    blocks: "list[tuple[str, torch.nn.Module]]"
    outside: "list[tuple[str, torch.nn.Module]]"
    blocks_parent: Optional[torch.nn.Module] = None
    why_not: Optional[str] = None  # None: regional compilation is correct

    @property
    def block_pattern(self) -> str:
        return self.blocks[0][0].rpartition(".")[0] + ".*" if self.blocks else ""

    @classmethod
    def of(cls, model: torch.nn.Module, config: HaloConfig) -> "RegionalPlan":
        if config.rotate == "fused":
            return cls([], [], why_not="option rotate='fused' rotates the residual stream "
                                       "across the whole graph")
        blocks, parent = _repeated_blocks(model)
        if not blocks:
            return cls([], [], why_not="no repeated blocks (an nn.ModuleList of one class "
                                       "holding linears)")
        block_ids = {id(block) for _, block in blocks}
        outside, uncompiled = [], []
        _modules_outside(model, "", block_ids, outside, uncompiled)
        plan = cls(blocks, outside, parent)
        if uncompiled:
            plan.why_not = (f"{', '.join(uncompiled)} would run uncompiled (a 2-D parameter of a "
                            "module that contains the blocks)")
            return plan
        for group in (blocks, *([named] for named in outside)):
            try:
                _config_relative_to(config, group)
            except _TreatedDifferently as error:
                plan.why_not = str(error)
                return plan
        return plan

    def compile(self, config: HaloConfig) -> None:
        register_region(self.block_pattern, [block for _, block in self.blocks])
        block_config = _config_relative_to(config, self.blocks)
        for _, block in self.blocks:
            _compile_module(block, block_config)
        for name, module in self.outside:
            register_region(name, [module])
            _compile_module(module, _config_relative_to(config, [(name, module)]))
        if _creates_kv_cache(self.blocks_parent):
            self.blocks_parent.register_forward_pre_hook(_no_kv_cache_unless_asked,
                                                         with_kwargs=True)


def _repeated_blocks(model: torch.nn.Module):
    """The outermost nn.ModuleList whose children (two or more) are all of one class and hold
    linears, as (name, block) pairs, and the module holding that list."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) == 1 and _holds_linear(module[0]):
            parent_name = name.rpartition(".")[0]
            return ([(f"{name}.{i}", child) for i, child in enumerate(module)],
                    model.get_submodule(parent_name))
    return [], None


def _is_linear_owner(module: torch.nn.Module) -> bool:
    return (not isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            and any(p.dim() == 2 for p in module.parameters(recurse=False)))


def _holds_linear(module: torch.nn.Module) -> bool:
    return any(_is_linear_owner(sub) for sub in module.modules())


def _modules_outside(module, prefix, block_ids, outside, uncompiled) -> None:
    """Collect the largest submodules of `module` that hold a linear and no block (compiled on
    their own), and the names of linears owned by modules containing blocks (which would run
    uncompiled)."""
    if _is_linear_owner(module):
        uncompiled.append(prefix or type(module).__name__)
    for name, child in module.named_children():
        child_name = f"{prefix}.{name}" if prefix else name
        if id(child) in block_ids:
            continue
        if any(id(sub) in block_ids for sub in child.modules()):
            _modules_outside(child, child_name, block_ids, outside, uncompiled)
        elif _holds_linear(child):
            outside.append((child_name, child))


class _TreatedDifferently(ValueError):
    pass


def _config_relative_to(config: HaloConfig, group) -> HaloConfig:
    """`config` with its `layers` globs resolved for the linears of the (name, module) pairs of
    `group`, and named relative to a module: a module compiled on its own names its linears
    relative to itself. Raises _TreatedDifferently where the globs set different options for one
    linear of two modules of the group (they cannot share a graph)."""
    if not config.layers:
        return config
    first_name, first = group[0]
    layers = []
    for relative in sorted(fallbacks.linear_names(first)):
        settings = [config.for_layer(_full_name(name, relative)) for name, _ in group]
        for (name, _), setting in zip(group, settings, strict=False):
            if setting != settings[0]:
                raise _TreatedDifferently(
                    f"option 'layers' sets {_full_name(first_name, relative)} and "
                    f"{_full_name(name, relative)} differently")
        if settings[0] is None:
            layers.append((relative, None))
        elif settings[0] != config.defaults:
            layers.append((relative, {key: getattr(settings[0], key) for key in LAYER_KEYS
                                      if getattr(settings[0], key) != getattr(config.defaults,
                                                                              key)}))
    return dataclasses.replace(config, layers=tuple(layers))


def _full_name(module_name: str, relative: str) -> str:
    # A module that is itself a linear names it "" (the module) or "weight" (in its graph).
    if relative in ("", "weight"):
        return module_name
    return f"{module_name}.{relative}"


def _compile_module(module: torch.nn.Module, config: HaloConfig) -> None:
    """`module.compile(backend="halo")`, except for modules whose forward is torch's own
    (`nn.Linear`, `nn.Sequential`): Dynamo never starts tracing in torch.nn's files, so their
    `compile()` would compile nothing. Those are called through a function of ours, compiled
    as `Module.compile` compiles `_call_impl`, with a code object of its own per module (Dynamo
    keeps its graphs and recompile count per code object, as for a module's own forward)."""
    if not type(module).forward.__module__.startswith("torch."):
        module.compile(backend="halo", options=config)
        return
    code = _call_module.__code__.replace(co_name=f"halo_call_{type(module).__name__}")
    call = types.FunctionType(code, _call_module.__globals__, code.co_name)
    module._compiled_call_impl = torch.compile(types.MethodType(call, module), backend="halo",
                                               options=config)


def _call_module(self, *args, **kwargs):
    return self._call_impl(*args, **kwargs)  # `self`: the report and fallbacks read it


def _creates_kv_cache(module: Optional[torch.nn.Module]) -> bool:
    return (module is not None
            and bool(getattr(getattr(module, "config", None), "use_cache", False))
            and "use_cache" in inspect.signature(module.forward).parameters)


def _no_kv_cache_unless_asked(module, args, kwargs):
    """A Hugging Face KV cache is indexed by each block's `layer_idx`: Dynamo guards on it and
    compiles one graph per block. Training does not need it; a caller asking for it keeps it."""
    if kwargs.get("use_cache") is None and kwargs.get("past_key_values") is None:
        kwargs = {**kwargs, "use_cache": False}
    return args, kwargs


class HaloCallback(TrainerCallback):
    """Compiles the Trainer's model with halo when the Trainer is built, so training and
    evaluation both run through it (regionally where correct: `compile_in_place`'s `regional`).
    Leave `TrainingArguments(torch_compile=False)` (the default): the Trainer would otherwise
    compile the model a second time, with a backend of its own."""

    def __init__(self, options: Union[HaloConfig, Mapping[str, Any], None] = None, *,
                 regional: Optional[bool] = None, **kwargs):
        self.options = config_from_call(options, kwargs)
        self.regional = regional

    def on_init_end(self, args, state, control, model: Optional[torch.nn.Module] = None,
                    **kwargs):
        if args.torch_compile:
            raise ValueError("HaloCallback compiles the model itself: set "
                             "TrainingArguments(torch_compile=False)")
        compile_in_place(model, self.options, regional=self.regional)
