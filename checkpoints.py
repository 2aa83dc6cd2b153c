"""Checkpoint I/O shared by the trainer and tools/: finite-weight checks and atomic publishing.

Two promises every writer in the project keeps:
- no non-finite weights are saved, loaded, merged or exported (`check_finite`);
- a folder a user can load is either complete or absent: files are written under a temporary
  name beside their destination and renamed into place, the file that marks the folder as
  loadable (e.g. adapter_config.json) last (`publish_files`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

from errors import UserError


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    import torch

    bad = []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


def check_finite(tensors: dict, source: str, hint: str = "") -> None:
    """Raise a one-line UserError when any tensor of `tensors` holds a NaN or an infinity."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise UserError(f"{source}: {len(bad)} of {len(tensors)} tensors hold NaN or infinite values "
                        f"(e.g. {bad[0]}){'; ' + hint if hint else ''}")


def all_close(diff: float, tolerance: float) -> bool:
    """`diff <= tolerance`, false for a NaN difference (`nan > tol` is false too, so never test that)."""
    return diff == diff and diff <= tolerance


@contextmanager
def staging_folder(destination: str):
    """A fresh hidden folder beside `destination` (same file system, so renames are atomic);
    removed on exit, whatever happens."""
    parent = os.path.dirname(os.path.abspath(destination)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(destination))}.partial-", dir=parent)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_files(staged: str, destination: str, last: str | None = None, keep_existing: tuple[str, ...] = ()) -> list[str]:
    """Move every file of `staged` into `destination`, `last` after all the others.

    `last` (the marker a loader looks for) is removed from `destination` first, so a crash at any
    point leaves either no marker or a marker beside complete files. Names in `keep_existing` are
    not moved when `destination` already has a file of that name (e.g. a user's README.md).
    Returns the names published.
    """
    os.makedirs(destination, exist_ok=True)
    names = sorted(n for n in os.listdir(staged) if os.path.isfile(os.path.join(staged, n)))
    if last is not None and os.path.lexists(os.path.join(destination, last)):
        os.remove(os.path.join(destination, last))
    moved = []
    for name in [n for n in names if n != last] + ([last] if last in names else []):
        target = os.path.join(destination, name)
        if name in keep_existing and os.path.lexists(target):
            continue
        _fsync(os.path.join(staged, name))
        os.replace(os.path.join(staged, name), target)
        moved.append(name)
    _fsync_dir(destination)
    return moved


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
