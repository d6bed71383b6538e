"""Atomic file writes: every file the product writes goes to a temporary file beside it, is flushed to disk,
then renamed over the old one, so a crash mid-write never replaces a good file with a half-written one.

No torch here: the configuration and the command line's first checks use it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write through ``write`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically replace the text file ``path`` (a crash leaves the old file whole)."""
    return atomic_write(Path(path), lambda f: f.write(text.encode()))


def check_output(
    path: str | Path,
    what: str,
    suffixes: tuple[str, ...] = (),
    inputs: tuple[str | Path, ...] = (),
    keep_out_of: tuple[str | Path, ...] = (),
) -> Path:
    """``path`` as a file this command may write, checked before any work is done.

    Args:
        inputs: files or folders the command reads: the output may not be one of them, nor lie in one
            (a DICOM series folder).
        keep_out_of: folders the output may not lie in (a model folder, a dataset): what the command
            owns or reads there is never replaced. Paths are compared resolved, links followed.

    Raises:
        ConfigError: a suffix not in ``suffixes`` (when given), a folder that does not exist or cannot
            be written, or ``path`` being (or lying in) one of the ``inputs`` or ``keep_out_of`` folders.
    """
    from amlp_core.errors import ConfigError

    out = Path(path)
    if suffixes and not any(out.name.lower().endswith(s) for s in suffixes):
        raise ConfigError(f"{what} {out} must end in {' or '.join(suffixes)}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"{what} {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {out}: folder {folder} is not writable")
    if out.is_dir():
        raise ConfigError(f"{what} {out} is a folder, not a file name")
    resolved = out.resolve()
    for source in inputs:
        if resolved == Path(source).resolve() or (out.exists() and Path(source).exists() and out.samefile(source)):
            raise ConfigError(f"{what} {out} is the input {source}: choose another file, the input is never replaced")
        if str(source) and Path(source).is_dir() and resolved.is_relative_to(Path(source).resolve()):
            raise ConfigError(f"{what} {out} lies in the input folder {source}: write it elsewhere")
    for owned in keep_out_of:
        if str(owned) and Path(owned).is_dir() and resolved.is_relative_to(Path(owned).resolve()):
            raise ConfigError(f"{what} {out} lies in {owned}, which this command reads: write it elsewhere")
    return out


def check_output_folder(
    path: str | Path, what: str, inputs: tuple[str | Path, ...] = (), keep_out_of: tuple[str | Path, ...] = ()
) -> Path:
    """``path`` as a folder this command may write its files into (made when missing, in an existing
    folder), checked before any work is done: never one of the ``inputs``, nor inside them or ``keep_out_of``.

    Raises:
        ConfigError: its parent does not exist, it is a file, it cannot be written, or it is (or lies in) an
            input or a folder the command reads.
    """
    from amlp_core.errors import ConfigError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} is a file, not a folder")
    resolved = out.resolve()
    for source in (*inputs, *keep_out_of):
        if str(source) and Path(source).is_dir() and resolved.is_relative_to(Path(source).resolve()):
            raise ConfigError(f"{what} {out} is or lies in {source}, which this command reads: write it elsewhere")
    target = out if out.is_dir() else (out.parent if str(out.parent) else Path("."))
    if not target.is_dir():
        raise ConfigError(f"{what} {out}: folder {target} does not exist")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {out}: folder {target} is not writable")
    out.mkdir(exist_ok=True)
    return out
