"""Multi-object tracking of detections: ByteTrack, from the `supervision` package.

Why ByteTrack, and why supervision's:

* ByteTrack (Zhang et al., ECCV 2022) associates by box overlap with a Kalman motion model and keeps the
  *low*-confidence detections for a second association with existing tracks. That suits a person
  detector whose score drops when a person is half occluded or at the edge of the view (the real video's
  people fall to 0.3-0.6 while crossing each other): the track survives instead of splitting. It needs
  no appearance model, so tracking costs nothing next to detection, and the ReID model runs once per
  tracklet (on its best crops) instead of once per box as DeepSORT-style trackers do.
* supervision (MIT, Roboflow) ships a plain numpy/scipy ByteTrack (`sv.ByteTrack`). supervision 0.30.x
  is pinned (setup.py, extra `video`): 0.30 is the first release that no longer requires `opencv-python`
  (the GUI build, which would sit beside this project's `opencv-python-headless` in the same `cv2`
  folder: whichever installs last wins, and uninstalling one breaks the other), and 0.31 removed
  ByteTrack in favour of the separate `trackers` package, which itself requires `opencv-python` again.
  `sv.ByteTrack` warns that it is deprecated; the warning is silenced here, and the wrapper below is the
  one place to change when moving to another implementation.

The tracker sees the sampled frames only (every K-th), so its frame rate is `fps / K` and the time a
lost track is kept is given in seconds.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["ByteTracker", "box_iou"]

#: The least IoU between a track updated in a frame and the box it is reported with.
MIN_OUTPUT_IOU = 0.1


class ByteTracker:
    """ByteTrack over per-frame boxes `(n, 5)` `[x1, y1, x2, y2, conf]`.

        tracker = ByteTracker(frame_rate=25 / 5)
        ids, boxes = tracker.update(boxes)   # track id per tracked box, and those boxes (as detected)

    `activation`: detections at or above it are matched first and (above `activation + 0.1`, ByteTrack's
    rule) may start a track; those below it only continue tracks (ByteTrack's second association).
    `lost_seconds`: how long a track that lost its detections is kept to be matched again.
    `match_iou`: the least overlap (IoU, weighted by the detection's confidence as ByteTrack does) of a
    detection with a track's predicted box to match them. 0.1, not supervision's 0.2: ByteTrack's Kalman
    state is (centre, aspect ratio, height) with a slowly adapting aspect ratio, so for a person walking
    in through the frame's edge (the box grows from a sliver to a whole body) the predicted box is far
    wider than the person; at 0.2 such a track broke in two on the generated test video and in the real
    video's third pass.
    """

    def __init__(self, frame_rate: float, activation: float = 0.6, lost_seconds: float = 1.0,
                 match_iou: float = 0.1) -> None:
        if frame_rate <= 0:
            raise ValueError(f"tracker frame rate must be > 0, got {frame_rate}")
        if not 0.0 < match_iou <= 1.0:
            raise ValueError(f"match_iou must be in (0, 1], got {match_iou}")
        try:
            import supervision as sv
        except ImportError as err:  # pragma: no cover - the video extra installs it
            raise ImportError("tracking needs supervision 0.30.x: pip install 'reid_lite[video]'") from err
        if not hasattr(sv, "ByteTrack"):
            raise ImportError(f"supervision {sv.__version__} has no ByteTrack (removed in 0.31): "
                              "pip install 'supervision>=0.30,<0.31'")
        self._sv = sv
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # sv keeps a lost track for int(frame_rate / 30 * lost_track_buffer) frames.
            self.tracker = sv.ByteTrack(
                track_activation_threshold=float(activation), lost_track_buffer=max(1, round(lost_seconds * 30)),
                minimum_matching_threshold=1.0 - float(match_iou), frame_rate=float(frame_rate),
                minimum_consecutive_frames=1)

    def update(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Track ids (m,) int64 and their boxes (m, 5) as detected, for this frame's detections `boxes` (n, 5).

        supervision's `update_with_detections` maps its tracks back onto the detections by IoU >= 0.5
        between a track's Kalman state and the box; that state lags behind a person walking towards the
        camera when only every K-th frame is seen (its aspect ratio is smoothed while the height grows), and
        on the real video one of the two people of the second pass came out untracked. So the tracks that
        were updated in this frame (`update_with_tensors`) are assigned to this frame's detections here,
        one to one by the largest IoU (Hungarian), any overlap above `MIN_OUTPUT_IOU` accepted.
        """
        from scipy.optimize import linear_sum_assignment

        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
        tracks = self.tracker.update_with_tensors(boxes.copy())
        frame = self.tracker.frame_id
        live = [t for t in tracks if t.is_activated and t.frame_id == frame and t.external_track_id >= 0]
        if not live or not len(boxes):
            return np.zeros(0, dtype=np.int64), np.zeros((0, 5), dtype=np.float32)
        state = np.asarray([t.tlbr for t in live], dtype=np.float32)
        iou = box_iou(state, boxes[:, :4])
        rows, cols = linear_sum_assignment(-iou)
        ok = iou[rows, cols] > MIN_OUTPUT_IOU
        rows, cols = rows[ok], cols[ok]
        order = np.argsort(cols)
        ids = np.asarray([live[r].external_track_id for r in rows[order]], dtype=np.int64)
        return ids, boxes[cols[order]]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (n, m) of boxes `a` (n, 4) and `b` (m, 4), `[x1, y1, x2, y2]`."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:4] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:4] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)
