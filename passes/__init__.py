"""FX graph passes of the halo backend: analysis first, then transforms (see manager.py)."""

import sys as _sys

if __name__ != "halo_compile.passes":
    # This folder installs as halo_compile.passes; imported by its bare name from a checkout,
    # it hands over another package of that name, or the installed one (halo_compile/_checkout.py).
    from halo_compile._checkout import bare_import as _bare_import

    _sys.modules[__name__] = _bare_import(__name__, "halo_compile.passes", __file__)
else:
    from .analysis import AttentionSite, GraphAnalysis, LinearSite, NormSite, ResidualAdd
    from .context import PassContext
    from .manager import PassManager, default_passes

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
