"""Result files and folders that never look complete unless they are: write to a temporary name, then rename."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _default_mode() -> int:
    """The mode a new file gets from the user's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def with_default_mode(path: str | os.PathLike) -> None:
    """Files made by mkstemp or by libraries that write 0600 (safetensors) get the mode the user's umask gives."""
    os.chmod(path, _default_mode())


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write `payload` as indented JSON atomically (a reader sees the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")
    with_default_mode(tmp)
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def staging_dir(final: str | os.PathLike, fresh: bool = False) -> Path:
    """The folder that collects a result directory's files before `publish_dir` moves them into place.

    Its name is derived from the final path, so every rank of a job writes its shards to the same place. A
    single writer passes `fresh=True` to start from an empty one (a killed run's leftovers are removed)."""
    staging = _temporary_sibling(Path(final))
    if fresh:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def publish_dir(final: str | os.PathLike) -> Path:
    """Put the staged folder in place as `final`. A new folder, or one holding only a previous run's files of
    the same names, is replaced by renaming the complete staged folder (readers see the old folder, briefly
    none, then the new one; never a mix). A folder that also holds other files keeps them: the staged files are
    moved in one by one."""
    final = Path(final)
    staging = _temporary_sibling(final)
    for item in staging.rglob("*"):
        if item.is_file():
            with_default_mode(item)
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
        return final
    staged = {item.name for item in staging.iterdir()}
    if all(item.name in staged for item in final.iterdir()):
        retired = final.with_name(f".{final.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired)
        return final
    for item in staging.iterdir():
        target = final / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists() and item.is_dir():
            target.unlink()
        os.replace(item, target)
    staging.rmdir()
    return final


@contextlib.contextmanager
def staged(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh staging folder for `final` (one writer): published with one rename when the block succeeds,
    removed when it fails."""
    staging = staging_dir(final, fresh=True)
    try:
        yield staging
    except BaseException:
        discard_staging(final)
        raise
    publish_dir(final)


def discard_staging(final: str | os.PathLike) -> None:
    """Remove a half-written staging folder after a failure."""
    shutil.rmtree(_temporary_sibling(Path(final)), ignore_errors=True)


def check_output_dir(out: str | os.PathLike) -> None:
    """Fail before any work when a results folder cannot be written: the path is empty, the current folder or
    one above it (a result is published by renaming a folder into place, so it needs a folder of its own), a
    file, or its nearest existing ancestor is not a writable folder."""
    from safeneurons.errors import SafeneuronsError

    path = Path(out).expanduser()
    resolved, here = path.resolve(), Path.cwd().resolve()
    if not str(out).strip() or path.name in ("", ".", "..") or resolved == here or resolved in here.parents:
        raise SafeneuronsError(f"output {str(out)!r} is not a results folder of its own (the current folder, one "
                               f"above it, or empty): name a new or existing folder, such as out/results")
    if path.exists() and not path.is_dir():
        raise SafeneuronsError(f"output {path} is an existing file, not a folder")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SafeneuronsError(f"output {path} cannot be written: {ancestor} is not a writable folder")
    try:  # access() says yes to root everywhere, and some file systems (/proc) refuse new folders anyway
        os.rmdir(tempfile.mkdtemp(prefix=".safeneurons-probe-", dir=ancestor))
    except OSError as error:
        raise SafeneuronsError(f"output {path} cannot be written: no folder can be created in {ancestor} "
                               f"({error.strerror})") from None
