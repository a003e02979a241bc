"""Shared fixtures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from distributed_muon.launch.extensions import use_environment_extensions_dir

# DeepSpeed's JIT ops go to this environment's own folder (unless the user chose one), not to
# torch's per-user cache, where another environment's suite rebuilds them under our feet.
USER_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR")
use_environment_extensions_dir()

_STALE_LOCK_S = 600  # a JIT build takes ~3 min on 2 cores; an older lock is a killed build's


@pytest.fixture(scope="session")
def deepspeed_comm_op() -> None:
    """Build DeepSpeed's JIT shared-memory comm op once, in this process, before any test
    spawns ranks that would otherwise race to build it. A lock left by a killed build would
    hang every later build: stale ones are removed first."""
    from deepspeed.comm.torch import build_shm_op
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    if root.exists():
        for lock in root.rglob("lock"):
            if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
                lock.unlink(missing_ok=True)
    build_shm_op()
