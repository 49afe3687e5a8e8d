"""halo's Inductor post-grad passes: what runs on each graph AOTAutograd hands to Inductor
(forward and backward), installed by the backend as Inductor's `post_grad_custom_post_pass`.

In order: merge_unrotations.py (a sum of un-rotated gradients un-rotated once), then
batch_nonfinite_checks.py (one inf/NaN report per graph), then the pass the user had set, if
any.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .batch_nonfinite_checks import batch_nonfinite_checks
from .merge_unrotations import merge_unrotations


class HaloPostGradPasses(CustomGraphPass):
    """The passes above, then `then` (a user's own post-grad pass). `copy_scales`: the graph
    runs as CUDA graphs (batch_nonfinite_checks.py says why that matters)."""

    def __init__(self, then=None, copy_scales: bool = False):
        self.then = then
        self.copy_scales = copy_scales

    def __call__(self, graph: fx.Graph) -> None:
        merge_unrotations(graph)
        batch_nonfinite_checks(graph, self.copy_scales)
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> bytes:
        # Inductor's FX graph cache keys on it: the passes' source, and the chained pass's.
        key = hashlib.sha256()
        for function in (merge_unrotations, batch_nonfinite_checks, HaloPostGradPasses):
            key.update(Path(sys.modules[function.__module__].__file__).read_bytes())
        key.update(repr(self.copy_scales).encode())
        if self.then is not None:
            key.update(repr(self.then.uuid() if hasattr(self.then, "uuid") else self.then)
                       .encode())
        return key.digest()
