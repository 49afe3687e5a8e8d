"""halo-compile: a torch.compile backend for low-precision training with Hadamard rotations.

    cmodel = torch.compile(model, backend="halo", options={"format": "fp8_e4m3",
                                                           "hadamard": "halo2"})
    print(halo_compile.report(cmodel))
"""

from halo_compile import kernels  # noqa: F401  (registers the halo:: custom ops)
from halo_compile.backend import configure, halo_backend
from halo_compile.cached_weights import forget_cached_weights
from halo_compile.config import HADAMARD_PRESETS, Hadamard, HaloConfig, LayerConfig
from halo_compile.fallbacks import HaloFallbackError, HaloFallbackWarning
from halo_compile.kernels.quantize import NonFiniteInputError, raise_pending_nonfinite
from halo_compile.report import HaloReport, LayerReport, report

__all__ = [
    "HADAMARD_PRESETS",
    "Hadamard",
    "HaloConfig",
    "HaloFallbackError",
    "HaloFallbackWarning",
    "HaloReport",
    "LayerConfig",
    "LayerReport",
    "NonFiniteInputError",
    "configure",
    "forget_cached_weights",
    "halo_backend",
    "raise_pending_nonfinite",
    "report",
]
__version__ = "0.1.0"
