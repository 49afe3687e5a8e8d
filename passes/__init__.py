"""FX graph passes of the halo backend: analysis first, then transforms (see manager.py)."""

import importlib as _importlib
import sys as _sys

if __name__ != "halo_compile.passes":
    # This folder installs as halo_compile.passes. With a checkout's root on sys.path, a bare
    # `import passes` finds it; a second copy of the pass classes would not match the installed
    # ones: hand back the installed package instead (as kernels/__init__.py does).
    _sys.modules[__name__] = _importlib.import_module("halo_compile.passes")
else:
    from .analysis import AttentionSite, GraphAnalysis, LinearSite, NormSite, ResidualAdd
    from .manager import PassContext, PassManager, default_passes

    __all__ = [
        "AttentionSite",
        "GraphAnalysis",
        "LinearSite",
        "NormSite",
        "PassContext",
        "PassManager",
        "ResidualAdd",
        "default_passes",
    ]
