"""Writing outputs so that they appear complete or not at all.

Every output (a checkpoint export, a GGUF file, an organism build, a statistics or affinity
cache entry, edited layers, a results file) is staged beside its target and renamed into
place: an interrupted run leaves the previous output (or none), never half of one.
`staged_directory` stages a directory, `staged_file` a file, `atomic_write` a text.
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


@contextlib.contextmanager
def staged_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temporary sibling of `target` (same suffix, so writers that add one do
    not); on success it is flushed to disk, given ordinary permissions and renamed over
    `target`, on any failure or interrupt removed. Unique, so processes sharing a cache do
    not write into each other's file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                suffix=f".tmp{target.suffix}")
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        with temporary.open("rb") as written:
            os.fsync(written.fileno())
        default_permissions(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, text: str) -> Path:
    """Write `text` to a temporary sibling and rename it over `path`."""
    with staged_file(path) as temporary:
        temporary.write_text(text)
    return path
