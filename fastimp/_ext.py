"""Loads the optional compiled extension ``fastimp._C`` and says why when it is missing."""
from __future__ import annotations

import os

import torch  # noqa: F401  (loads libc10 and libtorch, which fastimp._C links against)

_C = None
error: str | None = None

if os.environ.get("FASTIMP_DISABLE_EXT") == "1":
    error = "disabled by FASTIMP_DISABLE_EXT=1"
else:
    try:
        from fastimp import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # not built, or built against another torch
        error = (f"the compiled extension fastimp._C is not importable ({exc}); build it with "
                 "`make build` or `pip install --no-build-isolation -e .`")


def has(name: str) -> bool:
    """Whether the extension is loaded and exports ``name``."""
    return _C is not None and hasattr(_C, name)


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled())
