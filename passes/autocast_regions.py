"""Analysis: the autocast dtype in effect at each node of a Dynamo graph.

`F.linear` under `torch.autocast` computes in the autocast dtype: its floating inputs are cast
to it, and so is its result. halo's ops are custom ops, which autocast leaves alone, so the
quantize pass casts a linear's input where autocast would (the op computes in its input's
dtype). Autocast state comes from two places: the state around the compiled call (Dynamo guards
on it, so a graph only ever runs under the state it was compiled with), and
`_enter_autocast` / `_exit_autocast` nodes, which Dynamo records for `with torch.autocast(...)`
blocks inside the compiled code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

# The floating dtypes autocast casts (it leaves float64 alone, as eager does).
AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def ambient_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of `device_type` around the compiled call, or None when off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_dtypes(graph: fx.Graph, device_type: str,
                    at_entry: Optional[torch.dtype]) -> dict[fx.Node, Optional[torch.dtype]]:
    """For each node, the autocast dtype of `device_type` in effect where it runs (None: off),
    given the one in effect where the graph is entered: the ambient one for a Dynamo graph, the
    one at the call of a higher-order op for its subgraph (a checkpointed region inside a
    `with torch.autocast(...)` of the model's forward, as accelerate wraps it)."""
    from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

    stack = [at_entry]
    state = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _enter_autocast:
            region_device, dtype, enabled = (*node.args, None, None, None)[:3]
            if region_device != device_type:  # another device's region changes nothing here
                stack.append(stack[-1])
            elif enabled is False:
                stack.append(None)
            else:
                stack.append(dtype or torch.get_autocast_dtype(device_type))
        elif node.op == "call_function" and node.target is _exit_autocast and len(stack) > 1:
            stack.pop()
        state[node] = stack[-1]
    return state
