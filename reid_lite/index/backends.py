"""Which storage a gallery argument names: a folder (`DirectoryStorage`) or a PostgreSQL connection URI.

    storage_for("/data/gallery")                                   # DirectoryStorage
    storage_for("postgresql://reid@db:5432/city?gallery=cams")     # PostgresStorage (the `postgres` extra)

Every command, the server and `Gallery.open`/`Gallery.staging` go through `storage_for`, so a backend is one
class behind the `GalleryStorage` interface (`reid_lite.index.interfaces`) plus one line here.
"""

from __future__ import annotations

import os

from .interfaces import GalleryStorage
from .storage import DirectoryStorage, GalleryError

__all__ = ["DATABASE_SCHEMES", "is_database_uri", "storage_for"]

#: URI schemes naming a PostgreSQL gallery (libpq's two spellings).
DATABASE_SCHEMES = ("postgresql://", "postgres://")


def is_database_uri(gallery: object) -> bool:
    """Whether `gallery` is a PostgreSQL connection URI rather than a folder."""
    return isinstance(gallery, str) and gallery.startswith(DATABASE_SCHEMES)


def storage_for(gallery: str | os.PathLike | GalleryStorage) -> GalleryStorage:
    """The storage a gallery argument names: a storage object as it is, a `postgresql://` URI a
    `PostgresStorage`, anything else a folder (`DirectoryStorage`)."""
    if not isinstance(gallery, (str, os.PathLike)):
        return gallery
    if is_database_uri(gallery):
        raise GalleryError("PostgreSQL galleries are not available yet (issue 21)")
    return DirectoryStorage(gallery)
