"""A corpus that needs no download: the running interpreter's standard library sources.

Byte-level (vocabulary 256). Files are sorted by path; every 10th file is validation, the
rest training, so the split is fixed for a given Python. Batches are a pure function of
``(seed, step)``: a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 256


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8, all training files concatenated
    val: torch.Tensor
    files: int
    source: str


def load_corpus(max_bytes: int | None = None) -> Corpus:
    """The stdlib ``*.py`` files of this interpreter (``max_bytes`` caps each split)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise RuntimeError(f"no Python sources under {root}: the corpus needs the stdlib sources")
    train, val = bytearray(), bytearray()
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (val if i % 10 == 0 else train).extend(data + b"\n")
    if max_bytes:
        train, val = train[:max_bytes], val[:max_bytes]
    as_tensor = lambda b: torch.frombuffer(b, dtype=torch.uint8).clone()  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), len(files), str(root))


def batch(data: torch.Tensor, seed: int, step: int, rows: int, seq: int) -> tuple[torch.Tensor,
                                                                                   torch.Tensor]:
    """Global batch ``step``: ``rows`` random windows of ``seq + 1`` bytes -> (inputs, targets),
    both ``[rows, seq]`` int64."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq - 1, (rows,), generator=gen)
    windows = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]
