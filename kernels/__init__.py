"""Custom ops of halo-compile. Importing this package registers them with torch.library."""

import sys as _sys

if __name__ != "halo_compile.kernels":
    # This folder installs as halo_compile.kernels; imported by its bare name from a checkout,
    # it hands over another package of that name, or the installed one (halo_compile/_checkout.py).
    from halo_compile._checkout import bare_import as _bare_import

    _sys.modules[__name__] = _bare_import(__name__, "halo_compile.kernels", __file__)
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
