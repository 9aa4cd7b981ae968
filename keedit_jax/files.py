"""Writing outputs so that they appear complete or not at all.

A checkpoint export, an organism build and a results file are staged beside their target and
renamed into place: an interrupted run leaves the previous output (or none), never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_directory(target: Path, tag: str = "staging") -> Iterator[Path]:
    """Yield an empty sibling `.{name}.{tag}.*` directory; on success it replaces `target`
    (with ordinary permissions), on any failure or interrupt it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}.", dir=target.parent))
    try:
        yield staging
        default_permissions(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def default_permissions(directory: Path) -> None:
    """mkdtemp, mkstemp and safetensors create private (0700 / 0600) paths; a checkpoint or a
    cache shared by a team needs the modes the user's umask gives ordinary files."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *(directory.rglob("*") if directory.is_dir() else ())]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def check_writable_directory(directory: str | os.PathLike, what: str, remedy: str = "") -> Path:
    """Create `directory` and prove a file can be written there, before the work whose result
    goes there; PermissionError naming `what` (and `remedy`) otherwise."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass  # created and removed: the directory takes new files
    except OSError as err:
        raise PermissionError(f"{what} {path} is not writable ({err.strerror})"
                              + (f": {remedy}" if remedy else "")) from err
    return path


def atomic_write(path: Path, text: str) -> Path:
    """Write `text` to a temporary sibling and rename it over `path`."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path
