"""Make `turbo_serve` and `turbo_kernels` importable from a source checkout that was not
`pip install -e`'d, in this process and in the processes it starts (Ray workers).

The kernels live in kernels/ but are imported as turbo_kernels (a top-level `kernels` would clash
with a package transformers probes for), so a bare checkout on PYTHONPATH does not provide them. On
a GPU host that only has the repository copied over, this links both packages under their import
names into a temporary folder put first on sys.path and PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def importable_from_checkout() -> None:
    if importlib.util.find_spec("turbo_serve") and importlib.util.find_spec("turbo_kernels"):
        return
    shim = Path(tempfile.mkdtemp(prefix="turbo-serve-path-"))
    (shim / "turbo_serve").symlink_to(REPO / "turbo_serve")
    (shim / "turbo_kernels").symlink_to(REPO / "kernels")
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
