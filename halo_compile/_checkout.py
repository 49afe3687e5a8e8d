"""What a bare `import kernels` / `import passes` finds when a checkout's root is on sys.path.

The folders `kernels/` and `passes/` install as halo_compile.kernels and halo_compile.passes,
but run from a checkout (a notebook, `python -c`, `python -m pytest` in its root) they are also
importable under their bare names. transformers imports `kernels` to use Hugging Face's package
of that name (one of its dependencies): it must get that package, not ours. Where no other
package of the name is installed, the importer gets the installed halo_compile package itself,
so that no op is registered twice and no second weight cache exists.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType


def bare_import(name: str, installed: str, init_file: str) -> ModuleType:
    """The module a bare `import name` of a checkout's folder `name` (whose `__init__.py` is
    `init_file`) should give: another top-level package of that name, found on sys.path
    outside the checkout's root, or else `installed` (halo_compile's package). Registered in
    sys.modules under `name`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None:
        module = importlib.import_module(installed)
        sys.modules[name] = module
        return module
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: its own submodules resolve through it
    spec.loader.exec_module(module)
    return module
