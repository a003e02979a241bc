"""JIT extensions (DeepSpeed's ops) build per Python environment, in tests and `dmuon train`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from conftest import USER_EXTENSIONS_DIR
from distributed_muon.launch import train
from distributed_muon.launch.train_config import TrainConfig

OURS = str(Path(sys.prefix) / "var" / "torch_extensions")


def test_the_suite_builds_extensions_in_its_own_environment():
    assert os.environ["TORCH_EXTENSIONS_DIR"] == (USER_EXTENSIONS_DIR or OURS)


def test_dmuon_train_gives_its_ranks_this_environments_folder(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "_launch",
                        lambda cfg: seen.append(os.environ.get("TORCH_EXTENSIONS_DIR")) or {})
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    train.main(TrainConfig(out=str(tmp_path)))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    train.main(TrainConfig(out=str(tmp_path)))
    assert seen == [OURS, str(tmp_path / "mine")]  # the user's own choice is kept
