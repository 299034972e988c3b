"""Writing files and folders so a reader never sees half of one.

Everything is written under a hidden temporary name in the destination's own folder (the same
file system, so the rename is atomic) and renamed into place once complete: a crash or an error
at any moment leaves the previous file (or none) under the real name, never a truncated one that
a later run would pick up. ``mkstemp``/``mkdtemp`` make private 0600/0700 entries; what is renamed
into place gets the modes a plain ``open``/``mkdir`` would give (0o666 / 0o777 less the umask),
since checkpoints, exports and results are meant to be shared. A temporary that an error leaves
behind is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's umask. Reading it means setting it, so it is set straight back."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside ``path`` for writers that want a name rather than a stream
    (safetensors, matplotlib, tokenizers). It becomes ``path`` when the block ends without an
    exception and is removed when it raises.

    The name is ``.<name>.<random>.tmp``: hidden, and recognisable as a killed writer's."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left after the replace; the half file after an error


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new, never half."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8): readers see the old file or the new, never half."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON and a final newline (``dumps``: more
    options of :func:`json.dumps`, e.g. ``sort_keys``)."""
    write_text_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill. It becomes ``path`` when the block ends without
    an exception and is removed, with all it holds, when it raises.

    What is at ``path`` already is given up only at the rename: with ``replace`` a folder there
    is deleted whatever it holds (re-saving the same checkpoint); without, only an empty one
    may be there, so new files never mix with old ones."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if replace and path.exists():
            shutil.rmtree(path)
        elif path.exists():
            path.rmdir()  # an OSError unless empty
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
