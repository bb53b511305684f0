"""File systems through pyarrow: local paths and any URI pyarrow understands (s3://, gs://, ...).

Everything in `pipelines/` reads and writes through these few helpers, so a
source or an output can live on an object store without special cases.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import uuid
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import pyarrow.fs as pafs

from detr.errors import RaydetrError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")
TEMPORARY_MARK = ".tmp-"  # in the hidden names of files being written (open_output_atomic)


def has_scheme(path: str) -> bool:
    return "://" in path


def canonical(path: str) -> str:
    """One spelling per location, so that keys identify files rather than how their paths were typed: a local
    path made absolute with its links resolved, a URI with its scheme in lower case and its path normalised
    (no '.', '..' or doubled '/')."""
    if has_scheme(path):
        scheme, rest = path.split("://", 1)
        bucket, _, inner = rest.partition("/")
        inner = posixpath.normpath("/" + inner).lstrip("/") if inner else ""
        return f"{scheme.lower()}://{bucket}" + (f"/{inner}" if inner else "")
    return os.path.realpath(os.path.expanduser(path))


def escape_reason(name: str) -> str | None:
    """Why a relative name would leave the folder it is joined to (an absolute path, a drive letter, a '..'
    step), or None. Annotation files and archives name their images this way."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"^[a-zA-Z]:", normalised):
        return f"absolute path {name!r}"
    if ".." in normalised.split("/"):
        return f"path {name!r} leaves its folder through '..'"
    return None


def link_escape_reason(root: str, path: str) -> str | None:
    """Why a local `path` under the folder `root` really lies outside it (a symbolic link out of it), or None.
    Object stores have no links."""
    if has_scheme(root) or has_scheme(path):
        return None
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
        return None
    return f"{path} is a link to {real}, outside {root}"


class StoreUnavailableError(OSError):
    """An object store could not be reached (network, timeouts, server errors): worth a retry, not a verdict
    on the object."""


class StoreAccessError(OSError):
    """An object store refused a request for a reason the user must fix: a bucket that does not exist,
    credentials it does not accept, or no permission."""


# What the AWS SDK (pyarrow's S3) says when a store refuses a request, and what the user should hear.
_REFUSALS = {
    "NO_SUCH_BUCKET": "the bucket does not exist",
    "SIGNATURE_DOES_NOT_MATCH": "the store refused the credentials (check AWS_SECRET_ACCESS_KEY)",
    "INVALID_ACCESS_KEY_ID": "the store does not know the access key (check AWS_ACCESS_KEY_ID)",
    "ACCESS_DENIED": "access denied: the credentials may not read or write there",
    "EXPIRED_TOKEN": "the credentials have expired",
}


# What pyarrow's S3/GCS errors say when the store itself failed, not the object (AWS SDK error names, curl).
_UNAVAILABLE_MARKERS = ("NETWORK_CONNECTION", "curlCode", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "SLOW_DOWN",
                        "REQUEST_TIMEOUT", "THROTTLING", "Timeout was reached", "Could not connect",
                        "Connection refused", "Couldn't connect")




def store_error(uri: str, exc: OSError) -> OSError:
    """A store's failure on `uri` as one clear error naming it (StoreAccessError, StoreUnavailableError), or
    `exc` itself when it is about the object (not found, not a file) or a local path."""
    if not has_scheme(uri) or isinstance(exc, (FileNotFoundError, StoreAccessError, StoreUnavailableError)):
        return exc
    text = str(exc)
    for marker, meaning in _REFUSALS.items():
        if marker in text:
            return StoreAccessError(f"{redact(uri)}: {meaning}")
    if any(marker in text for marker in _UNAVAILABLE_MARKERS):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        where = f" at {endpoint}" if endpoint else ""
        return StoreUnavailableError(f"{redact(uri)}: the object store{where} did not answer "
                                     f"({text.split(';')[0][:200]})")
    return exc


def check_reachable(uri: str) -> None:
    """Fail at once, naming `uri`, when its store refuses us or does not answer (a wrong bucket or
    credentials, a store that is down); a path that merely does not exist yet is fine. Local paths pass."""
    if has_scheme(uri):
        _info(uri)


def redact(uri: str) -> str:
    """A URI without credentials in it (`s3://KEY:SECRET@bucket/x` -> `s3://***@bucket/x`), for messages."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    authority, sep, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    query_free = tail.split("?", 1)[0]
    return f"{scheme}://{authority}{sep}{query_free}"


_SECRET_OPTIONS = ("access_key", "secret_key", "session_token")


def check_no_credentials(uri: str) -> None:
    """Refuse credentials written into a URI's options: the URI would carry them into keys, manifests, logs
    and MLflow params. The store's standard settings (AWS_ACCESS_KEY_ID, ...) keep them out of all of those."""
    query = uri.split("?", 1)[1] if "?" in uri else ""
    named = sorted({part.split("=", 1)[0] for part in query.split("&")} & set(_SECRET_OPTIONS))
    if named or "@" in uri.split("://", 1)[-1].split("/", 1)[0]:
        raise RaydetrError(f"{redact(uri)}: credentials in the URI ({', '.join(named) or 'user:password@'}) would be "
                         "recorded with every key, manifest and MLflow param; set them in the environment instead "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the store's own settings)")


def resolve(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI."""
    if filesystem is not None:
        return filesystem, path
    if has_scheme(path):
        check_no_credentials(path)
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' (URIs and local POSIX paths alike)."""
    return posixpath.join(base, *parts)


def absolute(path: str | None) -> str | None:
    """A local path made absolute (against this process's working directory, which Ray's workers do not
    share); URIs and None as they are."""
    if path is None or has_scheme(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def parent(path: str) -> str:
    """The folder a file's path or URI names it in ("." for a bare file name): where a COCO JSON's images are
    looked up by default."""
    return path.rsplit("/", 1)[0] if "/" in path else "."


def is_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def _info(path: str) -> pafs.FileInfo:
    fs, p = resolve(path)
    try:
        return fs.get_file_info(p)
    except OSError as exc:
        raise store_error(path, exc) from None


def is_dir(path: str) -> bool:
    return _info(path).type == pafs.FileType.Directory


def exists(path: str) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def read_bytes(path: str, filesystem: pafs.FileSystem | None = None) -> bytes:
    fs, p = resolve(path, filesystem)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except OSError as exc:
        raise store_error(path, exc) from None


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


@contextmanager
def open_output_atomic(path: str) -> Iterator[Any]:
    """A stream that writes `path` all at once: the bytes go to a hidden temporary name (a leading
    dot, so dataset readers such as pyarrow and Spark skip it) that is renamed to `path` when the
    block ends, or deleted if it raises. Readers never see half a file."""
    fs, p = resolve(path)
    parent = posixpath.dirname(p)
    tmp = posixpath.join(parent, f".{posixpath.basename(p)}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}")
    try:
        if parent:
            fs.create_dir(parent, recursive=True)
        try:
            with fs.open_output_stream(tmp) as stream:
                yield stream
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise
        fs.move(tmp, p)
    except OSError as exc:
        raise store_error(path, exc) from None


def create_new(path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist; True when this call created it. On a local disk the file
    appears whole and at most one of several concurrent callers creates it (a hard link, which fails when the
    name exists). Object stores have no such primitive here: a caller writes when it sees no file, then
    reads back, so of several callers within one request's time each may return True, and the file holds
    the last one's bytes; callers that must agree compare what they read back."""
    if not has_scheme(path):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if exists(path):
        return False
    write_bytes_atomic(path, data)
    return read_bytes(path) == data


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    with open_output_atomic(path) as stream:
        stream.write(data)


def remove(path: str) -> None:
    """Delete a file (local or on an object store) if it is there."""
    fs, p = resolve(path)
    try:
        if fs.get_file_info(p).type == pafs.FileType.File:
            fs.delete_file(p)
    except OSError as exc:
        raise store_error(path, exc) from None


def _with_scheme(original: str, fs_path: str) -> str:
    """Give a path listed inside a file system the URI scheme of the path the user gave."""
    if has_scheme(original):
        scheme = original.split("://", 1)[0]
        return f"{scheme}://{fs_path}"
    return fs_path


def _listing_plan(path: str, extensions: Iterable[str] | None) -> tuple[str, str | None, tuple[str, ...] | None]:
    """(folder to list, glob pattern the names must match or None, lower-case suffixes or None) for a
    folder, file or glob."""
    exts = tuple(e.lower() for e in extensions) if extensions is not None else None
    pattern = None
    if is_glob(path):
        # The folder to list is the part before the first glob character.
        head = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)]
        base = head.rsplit("/", 1)[0] if "/" in head else "."
        pattern = path if has_scheme(path) else os.path.abspath(path)
        path = base
    return path, pattern, exts


def listing_root(path: str) -> str:
    """The folder a listing of `path` covers: the folder itself, a file's folder, or a glob's fixed part."""
    folder = _listing_plan(path, None)[0]
    if not has_scheme(folder) and os.path.isfile(folder):
        return os.path.dirname(folder) or "."
    return folder


def _keeps(name: str, pattern: str | None, exts: tuple[str, ...] | None) -> bool:
    if exts is not None and not name.lower().endswith(exts):
        return False
    return pattern is None or fnmatch.fnmatchcase(name, pattern)


def not_found(path: str) -> FileNotFoundError:
    """The error for a path that does not exist, saying so when it is an object store's bucket that is missing."""
    if has_scheme(path):
        bucket = path.split("://", 1)[1].split("/", 1)[0]
        fs, _ = resolve(path)
        try:
            if bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                return FileNotFoundError(f"{redact(path)}: the bucket {bucket!r} does not exist")
        except OSError:
            pass
    return FileNotFoundError(f"{redact(path)}: no such file or folder")


def _root_info(fs: pafs.FileSystem, p: str, path: str) -> pafs.FileInfo:
    try:
        info = fs.get_file_info(p)
    except OSError as exc:
        raise store_error(path, exc) from None
    if info.type == pafs.FileType.NotFound:
        raise not_found(path)
    return info


def _list(fs: pafs.FileSystem, selector: pafs.FileSelector, path: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(selector)
    except OSError as exc:
        raise store_error(path, exc) from None


def check_listable(path: str) -> None:
    """Raise FileNotFoundError, as `list_files` would, when the folder or file to list (for a glob: the
    folder before its first glob character) does not exist. One request; lists nothing."""
    root, _, _ = _listing_plan(path, None)
    fs, p = resolve(root)
    _root_info(fs, p, root)


def list_files(path: str, extensions: Iterable[str] | None = None, recursive: bool = True) -> list[str]:
    """Files under a folder, or matching a glob (`data/*/img_*.jpg`), sorted, as paths/URIs.

    `extensions` filters by lower-case suffix (e.g. IMAGE_EXTENSIONS); None keeps all.
    A path naming one file returns just that file. The whole listing is held at once:
    `FolderListing` gives the same files lazily.
    """
    path, pattern, exts = _listing_plan(path, extensions)
    fs, p = resolve(path)
    info = _root_info(fs, p, path)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = _list(fs, pafs.FileSelector(p, recursive=recursive or pattern is not None), path)
    out = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        name = _with_scheme(path, item.path)
        if _keeps(name, pattern, exts):
            out.append(name)
    return sorted(out)


class FolderListing:
    """The files `list_files(path, extensions, recursive)` returns, in the same order, listed lazily.

    Creating it lists the top level of the folder only (one listing call, pyarrow's
    `FileSelector(recursive=False)`): `top_files` are the files directly in it (every
    name, unfiltered). Iterating yields the matching files in sorted order, listing
    each sub-folder (recursively, one call) when its turn comes, so the first files
    come before the whole tree is listed and at most one sub-folder's listing is held
    at a time. pyarrow lists a folder level in one call (all its pages: on an object
    store, a request per thousand names), so a flat folder is listed at once.

    Sorted order is kept because, within one folder, a sub-folder `d` sorts as `d/`
    among the files beside it: every path under it starts with that prefix.
    """

    def __init__(self, path: str, extensions: Iterable[str] | None = None, recursive: bool = True) -> None:
        self.path = path
        self._root, self._pattern, self._exts = _listing_plan(path, extensions)
        self._recursive = recursive or self._pattern is not None
        self._fs, p = resolve(self._root)
        info = _root_info(self._fs, p, self._root)
        if info.type == pafs.FileType.File:
            entries = [info]
        else:
            entries = _list(self._fs, pafs.FileSelector(p, recursive=False), path)
        # Sub-folders sort by their name + "/", so that the files under them fall where `sorted` would put them.
        self._entries = sorted(
            (e.path + "/" if e.type == pafs.FileType.Directory else e.path, e.type, e.path) for e in entries
            if e.type in (pafs.FileType.File, pafs.FileType.Directory))
        self.top_files = [_with_scheme(self._root, e[2]) for e in self._entries if e[1] == pafs.FileType.File]

    def __iter__(self) -> Iterator[str]:
        for _, kind, fs_path in self._entries:
            if kind == pafs.FileType.File:
                names = [_with_scheme(self._root, fs_path)]
            elif self._recursive:
                infos = _list(self._fs, pafs.FileSelector(fs_path, recursive=True), self.path)
                names = sorted(_with_scheme(self._root, i.path) for i in infos if i.type == pafs.FileType.File)
            else:
                continue
            for name in names:
                if _keeps(name, self._pattern, self._exts):
                    yield name
