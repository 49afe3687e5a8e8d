"""What users call after writing weights in a way the weight cache cannot see."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

from halo_compile.distributed import unsharded_parameters
from halo_compile.kernels.weight_cache import WEIGHT_CACHE


def forget_cached_weights(
        model_or_params: Optional[Union[torch.nn.Module, torch.Tensor,
                                        Iterable[torch.Tensor]]] = None) -> None:
    """Drop the cached rotated and quantized forms of weights (frozen weights, and trained ones
    under option `cache_weights`) after writing them through `.data` or any other way that does
    not bump their version counter; the next call quantizes them again. Give a module (its
    parameters, FSDP2's unsharded ones included), a tensor or tensors, or nothing: every cached
    weight."""
    if model_or_params is None:
        WEIGHT_CACHE.forget()
        return
    if isinstance(model_or_params, torch.nn.Module):
        params = [*model_or_params.parameters(), *unsharded_parameters(model_or_params)]
    elif isinstance(model_or_params, torch.Tensor):
        params = [model_or_params]
    else:
        params = list(model_or_params)
    WEIGHT_CACHE.forget(params)
