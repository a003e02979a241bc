"""`dmuon train`'s checkpoint folders: a manifest written last, and finding a good one.

A checkpoint is ``<out>/ckpt/step_0000040/`` (the step, 7 digits). The backend writes its
files (DCP or DeepSpeed's own) into ``step_0000040.tmp``; once every rank is done, rank 0
writes ``manifest.json`` (the run's step, optimizer, backend, seed, and every file's size and
SHA-256), renames the folder and replaces ``<out>/ckpt/latest`` atomically. A folder without a
manifest, or whose files do not match it, is incomplete or corrupted: a resume says so and
takes the newest good one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"


def folder_name(step: int) -> str:
    return f"step_{step:07d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def begin(ckpt_dir: Path, step: int) -> Path:
    """The empty temporary folder a checkpoint of ``step`` is written into (rank 0 calls)."""
    tmp = ckpt_dir / (folder_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, meta: dict) -> Path:
    """Seal a fully written checkpoint (rank 0, after every rank wrote): manifest, rename,
    then ``latest``. Returns the final folder."""
    files = {os.fspath(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(tmp)}
    (tmp / MANIFEST).write_text(json.dumps({**meta, "files": files}, indent=1))
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = final.parent / (LATEST + ".tmp")
    pointer.write_text(final.name)
    os.replace(pointer, final.parent / LATEST)
    return final


class BadCheckpoint(ValueError):
    pass


def verify(folder: Path) -> dict:
    """The manifest's metadata if ``folder`` is complete and intact; else `BadCheckpoint`
    saying what is wrong."""
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise BadCheckpoint(f"{folder} does not exist")
    if not manifest.exists():
        raise BadCheckpoint(f"{folder} has no {MANIFEST} (it was not completely written)")
    try:
        meta = json.loads(manifest.read_text())
        listed = meta["files"]
    except (ValueError, KeyError) as err:
        raise BadCheckpoint(f"{manifest} is unreadable ({err})") from None
    for name, want in listed.items():
        path = folder / name
        if not path.exists():
            raise BadCheckpoint(f"{folder}: {name} is missing")
        if path.stat().st_size != want["bytes"]:
            raise BadCheckpoint(f"{folder}: {name} has {path.stat().st_size} bytes, "
                                f"{want['bytes']} were written (truncated?)")
        if _sha256(path) != want["sha256"]:
            raise BadCheckpoint(f"{folder}: {name} does not match its checksum (corrupted)")
    return meta


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    meta: dict


def find_resume_checkpoint(ckpt_dir: Path) -> tuple[CheckpointInfo, list[str]]:
    """The checkpoint ``latest`` names if it is good, else the newest good one before it.

    Returns it with notes on every bad checkpoint skipped; raises ValueError when there is
    none to resume from.
    """
    latest = ckpt_dir / LATEST
    if not latest.exists():
        raise ValueError(f"--resume: no checkpoint in {ckpt_dir} (train with --save-every N "
                         "first)")
    named = ckpt_dir / latest.read_text().strip()
    candidates = [named] + sorted(
        (p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
         and p.name < named.name), reverse=True)
    bad = []
    for folder in candidates:
        try:
            meta = verify(folder)
        except BadCheckpoint as err:
            bad.append(str(err))
            continue
        notes = [f"skipping a bad checkpoint: {reason}" for reason in bad]
        if bad:
            notes.append(f"resuming from the previous good checkpoint {folder.name}")
        return CheckpointInfo(folder, meta), notes
    raise ValueError(f"--resume: no good checkpoint in {ckpt_dir}: " + "; ".join(bad))
