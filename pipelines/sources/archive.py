"""Tar, tar.gz and zip archives of images, streamed member by member without unpacking.

Tar archives are read as a stream (`tarfile` mode "r|*"), so a multi-gigabyte
`.tar.gz` on an object store is never written to local disk; zip archives need
random access, which pyarrow's input files provide (also for s3:// and gs://).
Members whose path would escape the archive (`../x.jpg`, `/etc/x.jpg`, drive
letters) and links or devices are rejected as `unsafe_archive_member`.
"""
from __future__ import annotations

import posixpath
import re
import tarfile
import zipfile
from typing import Iterator

from pipelines import storage
from pipelines.sources.base import Source, Unit
from pipelines.sources.records import make_record
from pipelines.validation.errors import UNSAFE_ARCHIVE_MEMBER

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
MEMBER_SEPARATOR = "!"


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def member_key(archive: str, member: str) -> str:
    """The stable key of an archive member: `archive!member`."""
    return f"{archive}{MEMBER_SEPARATOR}{member}"


def unsafe_member_reason(name: str) -> str | None:
    """Why a member name is unsafe (would land outside the archive's root), or None."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"^[a-zA-Z]:", normalised):
        return f"absolute path {name!r}"
    if ".." in normalised.split("/"):
        return f"path {name!r} escapes the archive with '..'"
    if posixpath.normpath(normalised).startswith("../"):
        return f"path {name!r} escapes the archive"
    return None


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(storage.IMAGE_EXTENSIONS)


def _rejected(archive: str, name: str, detail: str) -> dict:
    return make_record(member_key(archive, name), source=archive, error_reason=UNSAFE_ARCHIVE_MEMBER,
                       error_detail=f"{archive}: {detail}")


def iter_tar(archive: str) -> Iterator[dict]:
    fs, path = storage.resolve(archive)
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isdir():
                continue
            reason = unsafe_member_reason(member.name)
            if reason is None and not member.isfile():
                reason = f"member {member.name!r} is a link or device, not a regular file"
            if reason is not None:
                yield _rejected(archive, member.name, reason)
                continue
            if not _is_image_name(member.name):
                continue
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            yield make_record(member_key(archive, member.name), source=archive, data=data)


def iter_zip(archive: str) -> Iterator[dict]:
    fs, path = storage.resolve(archive)
    with fs.open_input_file(path) as raw, zipfile.ZipFile(raw) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            reason = unsafe_member_reason(info.filename)
            if reason is not None:
                yield _rejected(archive, info.filename, reason)
                continue
            if not _is_image_name(info.filename):
                continue
            yield make_record(member_key(archive, info.filename), source=archive, data=zf.read(info))


def iter_archive(unit: Unit) -> Iterator[dict]:
    archive = unit.payload
    if archive.lower().endswith(ZIP_SUFFIXES):
        yield from iter_zip(archive)
    else:
        yield from iter_tar(archive)


def open_archives(path: str) -> Source:
    """One archive, or every archive in a folder or glob; one unit per archive."""
    archives = [path] if is_archive(path) and not storage.is_glob(path) and not storage.is_dir(path) else [
        p for p in storage.list_files(path) if is_archive(p)
    ]
    if not archives:
        raise FileNotFoundError(f"{path}: no .tar, .tar.gz or .zip archives found")
    units = [Unit(name=f"archive-{i:05d}", kind="archive", payload=a) for i, a in enumerate(archives)]
    return Source("archive", path, units, categories=None)
