"""The dataset record, the base class holding the three splits, and the dataset errors.

A record is `(img_path, pid, camid, viewid)` as in TransReID: `camid` is 0-based and `viewid` is 0 for
datasets without view labels.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

Record = tuple[str, int, int, int]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetLayoutError(FileNotFoundError):
    """A dataset is missing or does not follow its expected layout (the message names both)."""


class SidecarError(ValueError):
    """A row of a folder dataset's sidecar file is invalid (the message names file and line)."""


def split_info(records: Sequence[Record]) -> tuple[int, int, int, int]:
    """(# ids, # images, # cameras, # views) of one split; unlabelled pid -1 is not an identity."""
    pids = {r[1] for r in records if r[1] != -1}
    cams = {r[2] for r in records}
    views = {r[3] for r in records}
    return len(pids), len(records), len(cams), len(views)


def relabel_train(records: Sequence[Record]) -> list[Record]:
    """Map train pids to 0..P-1 in sorted pid order (sorted, so the mapping is reproducible)."""
    pid2label = {pid: label for label, pid in enumerate(sorted({r[1] for r in records}))}
    return [(path, pid2label[pid], camid, viewid) for path, pid, camid, viewid in records]


class ReIDDataset:
    """Base class: holds the three splits and their statistics (TransReID's BaseImageDataset)."""

    #: Name shown in the statistics table.
    name: str = "dataset"

    def __init__(self, train: list[Record], query: list[Record], gallery: list[Record],
                 verbose: bool = False) -> None:
        self.train = train
        self.query = query
        self.gallery = gallery
        (self.num_train_pids, self.num_train_imgs,
         self.num_train_cams, self.num_train_vids) = split_info(train)
        (self.num_query_pids, self.num_query_imgs,
         self.num_query_cams, self.num_query_vids) = split_info(query)
        (self.num_gallery_pids, self.num_gallery_imgs,
         self.num_gallery_cams, self.num_gallery_vids) = split_info(gallery)
        if verbose:
            self.print_statistics()

    def statistics_table(self) -> str:
        """The torchreid-style table: subset | # ids | # images | # cameras."""
        rule = "  " + "-" * 40
        rows = [f"=> Loaded {self.name}", rule, "  subset   | # ids | # images | # cameras", rule]
        for subset in ("train", "query", "gallery"):
            pids = getattr(self, f"num_{subset}_pids")
            imgs = getattr(self, f"num_{subset}_imgs")
            cams = getattr(self, f"num_{subset}_cams")
            rows.append(f"  {subset:<8} | {pids:5d} | {imgs:8d} | {cams:9d}")
        rows.append(rule)
        return "\n".join(rows)

    def print_statistics(self) -> None:
        """Print `statistics_table()`."""
        print(self.statistics_table())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train={self.num_train_imgs}, query={self.num_query_imgs}, "
                f"gallery={self.num_gallery_imgs})")


def validation_split(dataset: ReIDDataset, num_ids: int, seed: int = 0) -> ReIDDataset:
    """Hold out `num_ids` training identities as a validation retrieval split, for choices that must never
    see the test split (the epoch to keep, a calibration threshold).

    The held-out identities are drawn with `seed` among those seen by at least two cameras. Each one's
    images from its lowest camera become queries, the rest its gallery (so every query has a true match
    on another camera). The returned dataset trains on the remaining identities (relabelled 0..P-1) and
    has the validation split as its query and gallery; its `test_query`/`test_gallery` keep the original
    test split. ValueError when fewer than `num_ids` identities have two cameras, or none would be left.
    """
    cams: dict[int, set[int]] = {}
    for _, pid, camid, _ in dataset.train:
        cams.setdefault(pid, set()).add(camid)
    eligible = sorted(pid for pid, c in cams.items() if len(c) >= 2)
    if num_ids < 1 or num_ids > len(eligible) or num_ids >= len(cams):
        raise ValueError(f"a validation split of {num_ids} identities needs that many training identities seen "
                         f"by two cameras and some left to train on: {len(eligible)} of {len(cams)} have two")
    held = set(random.Random(seed).sample(eligible, num_ids))
    first_cam = {pid: min(cams[pid]) for pid in held}
    query = [r for r in dataset.train if r[1] in held and r[2] == first_cam[r[1]]]
    gallery = [r for r in dataset.train if r[1] in held and r[2] != first_cam[r[1]]]
    split = ReIDDataset(relabel_train([r for r in dataset.train if r[1] not in held]), query, gallery)
    split.name = f"{dataset.name} (validation: {num_ids} training identities held out)"
    split.test_query, split.test_gallery = dataset.query, dataset.gallery
    return split


def sie_counts(dataset: ReIDDataset) -> tuple[int, int]:
    """(camera_num, view_num) for SIE: the official training counts, raised to cover every id in any split.

    Camera ids index the SIE table, so with cameras missing from the training split (e.g. only c1, c3)
    the official `num_train_cams` would be too small; training and
    evaluation both size the table this way, so a checkpoint trained here always loads there.
    """
    records = list(dataset.train) + list(dataset.query) + list(dataset.gallery)
    max_cam = max((r[2] for r in records), default=-1) + 1
    max_view = max((r[3] for r in records), default=-1) + 1
    return max(dataset.num_train_cams, max_cam), max(dataset.num_train_vids, max_view)
