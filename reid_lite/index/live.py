"""A gallery that follows its published generation: what a long-running reader (the HTTP server) holds.

`LiveGallery.current()` asks the storage whether a writer has published since (`published_token()`: a
folder's CURRENT file, a few bytes; a database's one-row generation counter) on every call; when one has, it
opens the new generation (checksums verified) and swaps it in with a single reference assignment,
so a request sees either the old generation or the new one whole, never a mix. A request that
started on the old one keeps it: its faiss index is in memory and its SQLite file stays readable
(POSIX) even after the writer's garbage collection deletes the directory. While the new generation is
being opened, other requests go on with the old one instead of waiting.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from .backends import storage_for
from .gallery import Gallery
from .interfaces import GalleryStorage
from .storage import GalleryError, StageCallback

logger = logging.getLogger(__name__)

__all__ = ["LiveGallery"]


class LiveGallery:
    """The published generation of the gallery `gallery` (a folder, a database URI or a storage object),
    reopened when a writer publishes another. `root`: the gallery's own folder (None: a database).

    verify: check every file's sha256 on each open (the first and every reopen). device: where the
    gallery's model runs. The model is built once, here, and shared by every later generation.
    query_cfg: the model that embeds query images, when not the gallery's own (the same model with
    token merging, for a gallery built with `accept_merged_queries`; refused otherwise, here);
    `query_model` is then its (extractor, fingerprint), built once, else None.
    on_stage: the write-stage callback of the galleries that `writer()` opens (see `Gallery`).
    """

    def __init__(self, gallery: str | os.PathLike | GalleryStorage, verify: bool = True, device: str | None = None,
                 query_cfg: Any | None = None, on_stage: StageCallback | None = None) -> None:
        self.gallery = gallery
        self.storage = storage_for(gallery)
        self.root = self.storage.local_dir()
        self.verify = verify
        self.on_stage = on_stage
        self._current_text = self.storage.published_token()
        gallery = Gallery.from_storage(self.storage, verify=verify)
        gallery.device = device
        gallery.extractor()  # build the model now: the first request should not pay for it
        self.query_model = None if query_cfg is None else gallery.query_model(query_cfg)
        self._gallery = gallery
        self._reopen_lock = threading.Lock()
        self.reopen_errors: list[str] = []

    def writer(self) -> Gallery:
        """A separate handle on the gallery for one write (close it after), sharing the served model."""
        # Its own storage object (its own lock state and connection), unless one was handed in.
        writer = Gallery.from_storage(storage_for(self.gallery), verify=False, on_stage=self.on_stage)
        writer.share_model(self._gallery)
        return writer

    def current(self) -> Gallery:
        """The newest published generation (reopened here when CURRENT changed since the last call).

        A generation that cannot be opened (damaged, or CURRENT removed) is logged and skipped: the
        previous one goes on serving until CURRENT changes again."""
        text = self.storage.published_token()
        if text != self._current_text and text and self._reopen_lock.acquire(blocking=False):
            try:
                if text != self._current_text:
                    self._reopen(text)
            finally:
                self._reopen_lock.release()
        return self._gallery

    def _reopen(self, text: str) -> None:
        old = self._gallery
        try:
            fresh = Gallery.from_storage(self.storage, verify=self.verify)
            fresh.share_model(old)
        except (GalleryError, OSError, ValueError) as exc:
            message = f"cannot open the newly published generation ({exc}); still serving generation {old.generation}"
            logger.warning(message)
            self.reopen_errors.append(message)
            self._current_text = text  # do not retry on every request; a later publish is tried again
            return
        self._current_text = text
        self._gallery = fresh  # one assignment: the atomic switch (old stays valid for running requests)
        logger.info("now serving generation %d (%d crops)", fresh.generation, fresh.store.count())
