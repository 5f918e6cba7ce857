"""Writing files and folders so that no reader, and no killed run, ever finds half of one.

Both kinds are written under a temporary name beside the target, then renamed onto it:
`atomic_path` / `atomic_write` / `write_json` for a file (one `os.replace`), `replace_directory`
for a finished folder (the old one is moved aside first, so the target is always the complete
old or the complete new folder).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A new empty file beside `path` for the block to write: renamed over `path` when the block
    ends normally, removed when it raises. Its name ends in `path`'s suffix, for writers that go by
    it (savefig, np.save); it is created as open() creates a file (mode 0o666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield str(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (a str as UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(obj, path: str | os.PathLike) -> Path:
    """`obj` as indented JSON (non-ASCII characters kept as they are), atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def replace_directory(new_dir: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder `new_dir` onto `target` (in the same file system), replacing any
    previous one. The old folder is renamed aside first and removed after, so `target` is always
    either the complete old or the complete new version."""
    new_dir, target = Path(new_dir), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(new_dir, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
