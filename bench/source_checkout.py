"""Make `turbo_kernels` importable from a source checkout that was not `pip install -e`'d.

The package lives in kernels/ but is imported as turbo_kernels (a top-level `kernels` would clash
with a package transformers probes for), so a bare checkout on PYTHONPATH does not provide it. On a
GPU host that only has the repository copied over, this maps the folder under its package name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ensure_turbo_kernels() -> None:
    if importlib.util.find_spec("turbo_kernels") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "turbo_kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["turbo_kernels"] = module
    spec.loader.exec_module(module)
