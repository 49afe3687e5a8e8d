"""Custom ops of halo-compile. Importing this package registers them with torch.library."""

from .hadamard import block_hadamard, hadamard_block_size, hadamard_matrix
from .quantize import FORMATS, NonFiniteInputError, dequantize, quantize
from .quantized_linear import quantized_linear
from .scaled_matmul import scaled_matmul, scaled_matmul_reference

__all__ = [
    "FORMATS",
    "NonFiniteInputError",
    "block_hadamard",
    "dequantize",
    "hadamard_block_size",
    "hadamard_matrix",
    "quantize",
    "quantized_linear",
    "scaled_matmul",
    "scaled_matmul_reference",
]
