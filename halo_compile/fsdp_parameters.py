"""The unsharded parameters FSDP2 creates for a module: the tensors its compiled graphs read.

Its own module, so that the backend and the report can map a sharded model's parameters to its
graphs without importing halo_compile/distributed.py (which imports them)."""

from __future__ import annotations

from typing import Any, Iterator

import torch.nn as nn


def _fsdp_params(module: nn.Module) -> Iterator[Any]:
    """FSDP2's per-parameter records (FSDPParam) of every fully_shard'ed submodule."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    for submodule in module.modules():
        if not isinstance(submodule, FSDPModule):
            continue
        state = submodule._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12: one per mesh
        if groups is None:
            group = state._fsdp_param_group
            groups = [group] if group is not None else []
        for group in groups:
            yield from group.fsdp_params


def unsharded_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The unsharded parameters FSDP2 has created for `module` (after its first all-gather):
    the tensors its compiled graphs read. Empty for a module without fully_shard."""
    return [p._unsharded_param for p in _fsdp_params(module) if hasattr(p, "_unsharded_param")]
