"""Reading the files users give: regular files only, opened without blocking (a FIFO is refused rather
than waited on), with a size cap and a magic checked before the rest is read."""
import json
import os
import stat

from . import MoqaeError


def read_regular_file(path, limit=None, magic=None, wrong_magic=None):
    """The bytes of the regular file `path`; refuses anything else, a file of more than `limit` bytes,
    and one that does not start with `magic` (naming `wrong_magic`), each with a one-line MoqaeError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise MoqaeError(f"{path}: cannot read ({error.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else "not a regular file"
        raise MoqaeError(f"{path}: is {kind}, expected a regular file")
    with os.fdopen(fd, "rb") as f:
        if limit is not None and info.st_size > limit:
            raise MoqaeError(f"{path}: is {info.st_size} bytes, more than the {limit} this file may hold")
        start = f.read(len(magic)) if magic else b""
        if magic and start != magic and len(start) == len(magic):
            raise MoqaeError(f"{path}: {wrong_magic}")
        return start + f.read()


def read_text_file(path, what):
    """A regular file's text, UTF-8; `what` names it in the error for other encodings."""
    try:
        return read_regular_file(path).decode("utf-8")
    except UnicodeDecodeError as error:
        raise MoqaeError(f"{path}: {what} is not UTF-8 ({error.reason} at byte {error.start})") from None


def read_json_file(path, limit=None):
    """The JSON object in the regular UTF-8 file `path`; anything else is a one-line MoqaeError."""
    data = read_regular_file(path, limit)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise MoqaeError(f"{path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise MoqaeError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(value, dict):
        raise MoqaeError(f"{path}: expected a JSON object")
    return value
