"""File systems through pyarrow: local paths and any URI pyarrow understands (s3://, gs://, ...).

Everything in `pipelines/` reads and writes through these few helpers, so a
source or an output can live on an object store without special cases.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
import uuid
from typing import Iterable

import pyarrow.fs as pafs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")


def has_scheme(path: str) -> bool:
    return "://" in path


def resolve(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI."""
    if filesystem is not None:
        return filesystem, path
    if has_scheme(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' (URIs and local POSIX paths alike)."""
    return posixpath.join(base, *parts)


def is_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str, filesystem: pafs.FileSystem | None = None) -> bytes:
    fs, p = resolve(path, filesystem)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    fs, p = resolve(path)
    parent = posixpath.dirname(p)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


def _with_scheme(original: str, fs_path: str) -> str:
    """Give a path listed inside a file system the URI scheme of the path the user gave."""
    if has_scheme(original):
        scheme = original.split("://", 1)[0]
        return f"{scheme}://{fs_path}"
    return fs_path


def list_files(path: str, extensions: Iterable[str] | None = None, recursive: bool = True) -> list[str]:
    """Files under a folder, or matching a glob (`data/*/img_*.jpg`), sorted, as paths/URIs.

    `extensions` filters by lower-case suffix (e.g. IMAGE_EXTENSIONS); None keeps all.
    A path naming one file returns just that file.
    """
    exts = tuple(e.lower() for e in extensions) if extensions is not None else None
    pattern = None
    if is_glob(path):
        # The folder to list is the part before the first glob character.
        head = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)]
        base = head.rsplit("/", 1)[0] if "/" in head else "."
        pattern = path if has_scheme(path) else os.path.abspath(path)
        path = base
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive or pattern is not None))
    out = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        name = _with_scheme(path, item.path)
        if exts is not None and not name.lower().endswith(exts):
            continue
        if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
            continue
        out.append(name)
    return sorted(out)
