"""Reading a file that arrived: only a regular file, and only up to a bound.

A FIFO, a device or a socket named where a file is expected would block a read forever (``--config`` a
FIFO) or read without end (``--config /dev/zero``); a text file of gigabytes would fill the memory. Every
reader of an arriving file checks it here first and raises the caller's error type, naming the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from amlp_core.errors import AMLPError, DataError

#: The most a text file the product reads whole may hold: a config or site file, a dataset.json, a
#: ledger, a plan (a dataset.json of 100,000 cases is about 10 MB).
MAX_TEXT_BYTES = 64 * 2**20


def file_kind(mode: int) -> str:
    """What a ``stat`` mode names, in words."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | os.PathLike, what: str = "file", error: type[AMLPError] = DataError) -> Path:
    """``path`` (links followed), checked to be an existing regular file before anything opens it.

    Raises:
        ``error``: it is missing, or a folder, FIFO, socket or device; the message names it.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {file_kind(mode)}, not a regular file")
    return path


def read_text(
    path: str | os.PathLike, what: str = "file", error: type[AMLPError] = DataError, limit: int = MAX_TEXT_BYTES
) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes.

    Raises:
        ``error``: not a regular file, larger than ``limit``, unreadable or not UTF-8; naming the file.
    """
    path = regular_file(path, what, error)
    size = path.stat().st_size
    if size > limit:
        raise error(f"{what} {path} holds {size:,} bytes, more than the {limit:,} a {what} may hold")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:  # (it grew while it was read)
        raise error(f"{what} {path} holds more than the {limit:,} bytes a {what} may hold")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None
