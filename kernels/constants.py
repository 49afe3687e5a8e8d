"""Names and numbers shared by the options, the passes and the kernels.

A leaf module: it imports no other module of halo-compile, so that the options (config.py) and
the graph passes can read the allowed values without importing the Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Format:
    name: str
    dtype: torch.dtype
    max_value: float  # the largest finite magnitude; absmax is scaled onto it


FORMATS = {
    "fp8_e4m3": Format("fp8_e4m3", torch.float8_e4m3fn, 448.0),
    # Symmetric INT8: -128 is left out so that negation never overflows.
    "int8": Format("int8", torch.int8, 127.0),
}
"""The 8-bit formats the GEMMs take, by name."""

NO_FORMAT = "none"
"""Format "none": the matmuls run in high precision (rotations still apply)."""

MATMUL_FORMATS = (*FORMATS, NO_FORMAT)
"""What `halo::scaled_matmul` and `halo::quantized_linear` take."""

EMULATED_FORMATS = {"int4": (4, 4), "w4a8": (4, 8)}
"""4-bit formats for inference, emulated in plain torch: format -> (weight bits, activation
bits)."""

LINEAR_FORMATS = (*FORMATS, *EMULATED_FORMATS, NO_FORMAT)
"""Every value of the layer option `format`."""

GRANULARITIES = ("tensor", "row")
ROUNDINGS = ("nearest", "stochastic")

ROTATIONS = ("none", "inner", "outer")
"""Where a matmul is rotated (kernels/scaled_matmul.py): not at all, along the contraction
dimension of both operands, or along the left operand's rows (undone on the output)."""

MIN_AMAX = 1e-12
"""Floor on absmax so that a scale is never zero (an all-zero row quantizes to zeros)."""

MIN_BLOCK = 16
"""The smallest Hadamard block applied: below it an operand is not rotated."""

MAX_BLOCK = 256
"""The largest Hadamard block the fused Triton kernel applies (a `tl.dot` tile); larger blocks
take the unfused torch path."""

ADD_OPS = ("add", "iadd", "add_")
"""The names under which an FX graph records a tensor addition (residual adds, `x + eps`)."""
