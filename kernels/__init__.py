"""Custom ops of halo-compile. Importing this package registers them with torch.library."""

import importlib as _importlib
import sys as _sys

if __name__ != "halo_compile.kernels":
    # This folder installs as halo_compile.kernels. With a checkout's root on sys.path, a bare
    # `import kernels` finds it (transformers does that to probe for Hugging Face's
    # `kernels` package) and would register every op a second time, with a second weight cache:
    # hand back the installed package instead.
    _sys.modules[__name__] = _importlib.import_module("halo_compile.kernels")
else:
    from . import inductor_decompositions  # noqa: F401  (registers the CUDA decompositions)
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
