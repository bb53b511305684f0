"""Plain folders and globs of images, without annotations: what labelling jobs read.

`open_folder` lists the folder on the spot and plans one record per image (what
ingest needs: the same units every run). With `stream=True` it lists nothing: the
source is one `listing` unit, and whoever reads it (a Ray task, see pipelines.sources.reader)
lists the folder (`storage.FolderListing`: its top level, then each sub-folder when
its turn comes) and yields the same records in the same order, so the process that
plans the work never holds the listing or the records of a large object-store prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pipelines import storage
from pipelines.sources.archive import is_archive
from pipelines.sources.base import LISTING, Source, Unit, record_units
from pipelines.sources.records import make_record
from pipelines.validation.errors import UNSAFE_PATH


@dataclass(frozen=True)
class FolderToList:
    """A listing unit's payload: the folder or glob, and whether it may turn out to be a folder of archives
    (its kind was guessed from the path, see `detect_kind(..., list_folder=False)`)."""

    path: str
    archives_possible: bool = False


class FolderOfArchives(Exception):
    """A folder whose own files are all archives: it is an `archive` source, not a `folder` (what
    `detect_kind` says when it lists the folder). Raised by a streamed listing before any record."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} holds archives, not images: read it as an archive source")
        self.path = path

    def __reduce__(self):  # pickled when raised in a Ray task
        return FolderOfArchives, (self.path,)


def open_folder(path: str, rows_per_unit: int = 1000, *, stream: bool = False,
                archives_possible: bool = False, allow_outside_paths: bool = False) -> Source:
    """Every image file under a folder (recursively) or matching a glob, in sorted order.

    The key of each image is its path (or URI) as listed, so it is stable across runs.
    `stream=True`: one listing unit instead of planned records (the folder must exist; it
    is listed when read); `archives_possible` makes its reader raise FolderOfArchives when
    the folder's own files are all archives. A local image that is a symbolic link out of the
    folder is an `unsafe_path` error record unless `allow_outside_paths`.
    """
    if stream:
        storage.check_listable(path)
        return Source("folder", path, [Unit("folder-listing", LISTING, FolderToList(path, archives_possible))],
                      categories=None)
    files = storage.list_files(path, extensions=storage.IMAGE_EXTENSIONS)
    root = storage.listing_root(path)
    records = [image_record(path, f) if allow_outside_paths else checked_image_record(path, root, f) for f in files]
    return Source("folder", path, record_units(records, "folder", rows_per_unit), categories=None)


def iter_listed_images(folder: FolderToList) -> Iterator[str]:
    """The images of a listing unit's folder, listing as it goes, in sorted order."""
    listing = storage.FolderListing(folder.path, extensions=storage.IMAGE_EXTENSIONS)
    if folder.archives_possible and not storage.is_glob(folder.path) and listing.top_files and all(
            is_archive(f) for f in listing.top_files):
        raise FolderOfArchives(folder.path)
    yield from listing


def image_record(folder: str, image: str) -> dict:
    """The record of a listed image: its path is its key."""
    return make_record(image, source=folder, path=image)


def checked_image_record(folder: str, root: str, image: str) -> dict:
    """`image_record`, or an `unsafe_path` error record when the image is a link out of `root`."""
    reason = storage.link_escape_reason(root, image)
    if reason is None:
        return image_record(folder, image)
    return make_record(image, source=folder, error_reason=UNSAFE_PATH,
                       error_detail=f"{reason} (allow it with --allow-outside-paths)")


def iter_listing(unit: Unit) -> Iterator[dict]:
    """The records of a listing unit, listing as it goes: the same records, in the same order, as the planned
    units of `open_folder(path)`."""
    folder: FolderToList = unit.payload
    for image in iter_listed_images(folder):
        yield image_record(folder.path, image)
