"""Where torch builds JIT C++ extensions (DeepSpeed's ops): one folder per Python environment.

torch's default, ``~/.cache/torch_extensions/py311_cpu``, is shared by every environment of a
user with the same Python: two environments with other torch or DeepSpeed versions rebuild
each other's ops (measured: 8 rebuilds in 13 minutes of the test suite beside another one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

VARIABLE = "TORCH_EXTENSIONS_DIR"


def environment_extensions_dir() -> Path:
    return Path(sys.prefix) / "var" / "torch_extensions"


def use_environment_extensions_dir() -> str | None:
    """Set ``TORCH_EXTENSIONS_DIR`` to this environment's folder unless the user set it;
    returns the folder set, or None (set by the user, or the environment is read-only)."""
    if os.environ.get(VARIABLE):
        return None
    folder = environment_extensions_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a system Python: torch's per-user default is the better place
        return None
    os.environ[VARIABLE] = os.fspath(folder)
    return os.environ[VARIABLE]
