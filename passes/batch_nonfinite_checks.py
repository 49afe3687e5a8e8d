"""Inductor post-grad pass (post_grad.py): one inf/NaN report per compiled graph, not one per
matmul.

On CUDA every quantized matmul hands its operands' scales to `halo::checked_scale`
(kernels/scaled_matmul.py), which returns the GEMM's scale once it has queued the deferred
inf/NaN verdict. That op is opaque to Inductor, so each call is a trip through Python in the
middle of the generated code: ~0.3 ms of host time per matmul on the H100 host, which left a
two-layer decoder step's GPU idle for 10 of its 33 ms (measured on an H100).

This pass, which runs on each graph AOTAutograd hands to Inductor (forward and backward):
* replaces every `checked_scale(sa, sb, factor, where)` by `sa * factor` (by `sa` itself when
  the factor is 1, as without the check);
* puts one `halo::report_nonfinite` before the graph's output. It takes every checked scale
  tensor (once, however many matmuls share it) with the name of its matmul and operand and
  hands them to the deferred checks (kernels/quantize.py), which reduce the tensors of several
  graphs together: one concatenation, one max, one copy to pinned memory and one event.

What is reported does not change (the scales are inf/NaN exactly where their operands are, and
the error names the first bad operand in graph order); it is reported at the end of the graph
instead of at each matmul, which is no later than before for the deferred CUDA verdicts.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from halo_compile.kernels import scaled_matmul  # noqa: F401  (registers the ops)
from halo_compile.kernels.quantize import operand_name

_LOG = logging.getLogger(__name__)

CHECK = torch.ops.halo.checked_scale.default
REPORT = torch.ops.halo.report_nonfinite.default


def batch_nonfinite_checks(graph: fx.Graph, copy_scales: bool = False) -> int:
    """Rewrite `graph` in place as the module docstring says. Returns how many checks it moved.
    `copy_scales`: the graph will run as CUDA graphs, whose outputs the next replay overwrites,
    so the report keeps a copy of the scales (it runs outside the graphs: it is tagged
    cudagraph-unsafe)."""
    checks = [n for n in graph.nodes if n.op == "call_function" and n.target is CHECK]
    if not checks:
        return 0
    named: dict[fx.Node, str] = {}  # scale node -> the first matmul operand it belongs to
    for node in checks:
        sa, sb, factor, where = node.args
        named.setdefault(sa, operand_name(where, "left"))
        named.setdefault(sb, operand_name(where, "right"))
        if factor == 1.0:  # as scale_for_gemm without the check: no op at all
            scaled = sa
        else:
            with graph.inserting_before(node):
                scaled = graph.call_function(torch.ops.aten.mul.Tensor, (sa, factor))
            scaled.meta.update(node.meta)
        node.replace_all_uses_with(scaled)
        graph.erase_node(node)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    example = next(iter(named)).meta["val"]
    with graph.inserting_before(output):
        token = graph.call_function(torch.ops.aten.empty.memory_format, ([0],),
                                    {"dtype": torch.float32, "device": example.device})
        token.meta["val"] = example.new_empty((0,))
        report = graph.call_function(REPORT, (token, list(named), list(named.values()),
                                              copy_scales))
        report.meta["val"] = None
    _LOG.debug("%d inf/NaN checks batched into one report", len(checks))
    return len(checks)
