"""Tar, tar.gz and zip archives of images, streamed member by member without unpacking.

Tar archives are read as a stream (`tarfile` mode "r|*"), so a multi-gigabyte
`.tar.gz` on an object store is never written to local disk; zip archives need
random access, which pyarrow's input files provide (also for s3:// and gs://).
Members whose path would escape the archive (`../x.jpg`, `/etc/x.jpg`, drive
letters) and links or devices (tar's, and zip's Unix modes) are rejected as
`unsafe_archive_member`; a name repeated in one archive as `duplicate_archive_member`
(the first is read). A member larger than `MAX_MEMBER_BYTES` (declared, or found
while reading: no more is read) is `too_large` without being held in memory, so
a small compressed archive cannot exhaust a worker's memory.
"""
from __future__ import annotations

import stat
import tarfile
import zipfile
from typing import IO, Iterator

from pipelines import storage
from pipelines.sources.base import Source, Unit
from pipelines.sources.records import make_record
from pipelines.validation.decode import DEFAULT_MAX_BYTES
from pipelines.validation.errors import DUPLICATE_ARCHIVE_MEMBER, TOO_LARGE, UNSAFE_ARCHIVE_MEMBER

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
MEMBER_SEPARATOR = "!"
MAX_MEMBER_BYTES = DEFAULT_MAX_BYTES
"""The largest member read: the decode step's own byte limit (a larger one could never be decoded)."""
_CHUNK = 1 << 20


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def member_key(archive: str, member: str) -> str:
    """The stable key of an archive member: `archive!member`."""
    return f"{archive}{MEMBER_SEPARATOR}{member}"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(storage.IMAGE_EXTENSIONS)


def _rejected(archive: str, name: str, detail: str, reason: str = UNSAFE_ARCHIVE_MEMBER, key: str = "") -> dict:
    return make_record(key or member_key(archive, name), source=archive, error_reason=reason,
                       error_detail=f"{archive}: {detail}")


def _too_large(archive: str, name: str, size: int, limit: int) -> dict:
    return _rejected(archive, name, f"member {name!r} is {size} bytes, over the limit of {limit} bytes", TOO_LARGE)


def _read_at_most(stream: IO[bytes], limit: int) -> bytes | None:
    """The stream's bytes, or None as soon as there are more than `limit` (what was read is dropped)."""
    chunks, total = [], 0
    while chunk := stream.read(min(_CHUNK, limit + 1 - total)):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class _Names:
    """The member names an archive has shown so far: a repeated one is an error row of its own key."""

    def __init__(self, archive: str) -> None:
        self.archive, self.seen = archive, {}

    def repeated(self, name: str) -> dict | None:
        count = self.seen[name] = self.seen.get(name, 0) + 1
        if count == 1:
            return None
        return _rejected(self.archive, name, f"member name {name!r} appears {count} times; only the first is read",
                         DUPLICATE_ARCHIVE_MEMBER, key=f"{member_key(self.archive, name)}#{count}")


def iter_tar(archive: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    fs, path = storage.resolve(archive)
    names = _Names(archive)
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isdir():
                continue
            reason = storage.escape_reason(member.name)
            if reason is None and not member.isfile():
                reason = f"member {member.name!r} is a link or device, not a regular file"
            if reason is not None:
                yield _rejected(archive, member.name, reason)
                continue
            if not _is_image_name(member.name):
                continue
            if (repeated := names.repeated(member.name)) is not None:
                yield repeated
                continue
            if member.size > max_member_bytes:  # tar's header is the member's length: skipped unread
                yield _too_large(archive, member.name, member.size, max_member_bytes)
                continue
            f = tar.extractfile(member)
            data = _read_at_most(f, max_member_bytes) if f is not None else b""
            if data is None:
                yield _too_large(archive, member.name, member.size, max_member_bytes)
                continue
            yield make_record(member_key(archive, member.name), source=archive, data=data)


def _zip_link_or_device(info: zipfile.ZipInfo) -> bool:
    """A member made on Unix whose mode says symbolic link, device or anything but a regular file."""
    mode = info.external_attr >> 16
    return info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG)


def iter_zip(archive: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    fs, path = storage.resolve(archive)
    names = _Names(archive)
    with fs.open_input_file(path) as raw, zipfile.ZipFile(raw) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            reason = storage.escape_reason(info.filename)
            if reason is None and _zip_link_or_device(info):
                reason = f"member {info.filename!r} is a link or device, not a regular file"
            if reason is not None:
                yield _rejected(archive, info.filename, reason)
                continue
            if not _is_image_name(info.filename):
                continue
            if (repeated := names.repeated(info.filename)) is not None:
                yield repeated
                continue
            if info.file_size > max_member_bytes:
                yield _too_large(archive, info.filename, info.file_size, max_member_bytes)
                continue
            with zf.open(info) as member:  # stops at the declared size; a lie fails its CRC check
                data = _read_at_most(member, max_member_bytes)
            if data is None:
                yield _too_large(archive, info.filename, info.file_size, max_member_bytes)
                continue
            yield make_record(member_key(archive, info.filename), source=archive, data=data)


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
