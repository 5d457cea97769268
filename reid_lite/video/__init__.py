"""From camera video to tracklets: decode (OpenCV), detect (an SSD-style OpenVINO IR / ONNX file, batched),
track (ByteTrack from supervision), keep each track's best crops, embed them (the gallery's model,
batched) and aggregate them into one feature per tracklet.

One concern per module: `decode` (frames and their times), `detect` (the detector file), `track`
(ByteTrack), `crops` (the best-crop rule), `tracklets` (the tracklet, its aggregate feature), `embed`
(the gallery's FeatureExtractor as an embedder), `pipeline` (`ingest_video`, progress and per-stage speed),
`to_gallery` (`ingest_to_gallery`: one gallery entry per tracklet), `cli` (`reid-gallery ingest`).
"""

from .crops import CropRule, TrackCrops, box_cut_by_edge, sharpness
from .decode import Frame, FrameReader, VideoInfo, iter_frames, probe_video
from .detect import Detector, DetectorError, SSDDetector, parse_ssd_output
from .embed import extractor_embedder
from .pipeline import IngestResult, StageStats, ingest_video
from .to_gallery import VideoIngestReport, ingest_to_gallery
from .track import ByteTracker
from .tracklets import Embedder, Tracklet, TrackletRule, aggregate_features, build_tracklets

__all__ = [
    "ByteTracker", "CropRule", "Detector", "DetectorError", "Embedder", "Frame", "FrameReader", "IngestResult",
    "SSDDetector", "StageStats", "TrackCrops", "Tracklet", "TrackletRule", "VideoInfo", "VideoIngestReport",
    "aggregate_features", "box_cut_by_edge", "build_tracklets", "extractor_embedder", "ingest_to_gallery",
    "ingest_video", "iter_frames", "parse_ssd_output", "probe_video", "sharpness",
]
