"""halo's Inductor post-grad passes: what runs on each graph AOTAutograd hands to Inductor
(forward and backward), installed by the backend as Inductor's `post_grad_custom_post_pass`.

In order: merge_unrotations.py (a sum of un-rotated gradients un-rotated once), then
batch_nonfinite_checks.py (one inf/NaN report per graph), then the pass the user had set, if
any.

Its `uuid` is also how Inductor's on-disk caches (the FX graph cache, and AOTAutograd's, which
keys on the same details) tell halo's code apart: they key on the Dynamo graph, in which halo's
ops are opaque calls, not on what the decompositions traced from them (the Triton kernels and
their launches). So the uuid hashes all of halo-compile's source: a graph compiled by another
version of it is compiled again, not loaded. (Otherwise a machine that ran one version and
then another would run the first version's kernels under the second.)
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from halo_compile import _flags

from .batch_nonfinite_checks import batch_nonfinite_checks
from .merge_unrotations import merge_unrotations


class HaloPostGradPasses(CustomGraphPass):
    """The passes above, then `then` (a user's own post-grad pass). `copy_scales`: the graph
    runs as CUDA graphs (batch_nonfinite_checks.py says why that matters)."""

    def __init__(self, then=None, copy_scales: bool = False):
        self.then = then
        self.copy_scales = copy_scales

    def __call__(self, graph: fx.Graph) -> None:
        if _flags.merge_unrotations:
            merge_unrotations(graph)
        batch_nonfinite_checks(graph, self.copy_scales)
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> bytes:
        # Inductor's caches key on it: halo's source (see above), and the chained pass's.
        key = hashlib.sha256(source_digest())
        key.update(repr(self.copy_scales).encode())
        if self.then is not None:
            key.update(repr(self.then.uuid() if hasattr(self.then, "uuid") else self.then)
                       .encode())
        return key.digest()


def source_files() -> dict:
    """halo-compile's Python files by module name ("halo_compile.kernels.hadamard", ...): those
    of the packages halo_compile, halo_compile.kernels and halo_compile.passes (installed from
    separate folders)."""
    import halo_compile  # (here, not at the top: halo_compile imports this module)
    import halo_compile.kernels
    import halo_compile.passes

    return {f"{package.__name__}.{path.stem}": path
            for package in (halo_compile, halo_compile.kernels, halo_compile.passes)
            for path in Path(package.__file__).parent.glob("*.py")}


@functools.cache
def source_digest() -> bytes:
    """A hash of `source_files()`, names and contents (read once a process: the code imported
    does not change under it)."""
    key = hashlib.sha256()
    for name, path in sorted(source_files().items()):
        key.update(name.encode() + b"\0" + path.read_bytes())
    return key.digest()
