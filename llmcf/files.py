"""Files written whole or not at all: the one write-then-rename every stage uses for state a crash must not tear.

A file is staged beside its target under a name of its own process (several processes may write the same target at
once: the last rename wins) and renamed over the target in one step, so a reader sees the old file or the new one. A
directory (a converted model, an exported encoder) is staged under a unique name and renamed into place unless another
process put a complete one there first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A staging path for `path` (same directory, same suffix, so writers that add a suffix such as `np.savez` keep
    its name); when the block ends without an error it replaces `path` atomically, otherwise it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write `content` to `path` whole or not at all."""
    with staged_file(path) as staging:
        if isinstance(content, bytes):
            staging.write_bytes(content)
        else:
            staging.write_text(content)


@contextmanager
def staged_directory(target: Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """An empty staging directory for `target`, renamed into place when the block ends without an error. When another
    process renamed a directory there first and `complete(target)` holds, that copy is kept; the staging directory is
    always removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        try:
            staging.rename(target)
        except OSError:
            if not complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
