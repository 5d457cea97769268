"""Video to tracklets (reid_lite.video): a generated video with known people, a stand-in ONNX detector,
the real indoor video with the real pedestrian detector, and bad inputs."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from reid_lite.video import (
    CropRule,
    DetectorError,
    SSDDetector,
    TrackCrops,
    aggregate_features,
    box_cut_by_edge,
    build_tracklets,
    extractor_embedder,
    ingest_video,
    iter_frames,
    parse_ssd_output,
    probe_video,
)

pytest.importorskip("supervision")

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data/video beside the checkout (REID_LITE_VIDEO_DATA elsewhere, e.g. from a git worktree)
REAL = Path(os.environ.get("REID_LITE_VIDEO_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "video")

# ----------------------------------------------------------------------------- the generated video

W, H, FPS, N = 320, 240, 10.0, 120
#: person: colour (BGR), frames in the room, top-left (x1, y1) of its 30x80 body per frame (drawn cut by the edge)
PEOPLE = {
    "red": ((40, 40, 220), range(0, 100), lambda i: (-30 + 4 * i, 140)),  # walks in from the left, out right
    "green": ((40, 200, 40), range(30, 120), lambda i: (320 - 4 * (i - 30), 20)),  # in from the right, out left
    "blue": ((220, 60, 30), range(60, 120), lambda i: (150, 240 - 3 * (i - 60))),  # up from the bottom edge
}


def visible_frames(name: str, least: int = 8) -> tuple[int, int]:
    """First and last frame in which at least `least` pixels of the person's width and height show."""
    _, frames, pos = PEOPLE[name]
    shown = [i for i in frames if min(pos(i)[0] + 30, W) - max(pos(i)[0], 0) >= least
             and min(pos(i)[1] + 80, H) - max(pos(i)[1], 0) >= least]
    return shown[0], shown[-1]


def write_video(path: Path) -> Path:
    """The test video: a grey textured room, three coloured people crossing it at known frames, and a
    two-frame yellow flash (frames 10-11) standing in for a detector's spurious box."""
    rng = np.random.default_rng(0)
    bg = (np.linspace(90, 160, W)[None, :, None] + rng.normal(0, 6, (H, W, 1))).clip(0, 255)
    bg = np.repeat(bg, 3, axis=2).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert writer.isOpened()
    for i in range(N):
        frame = bg.copy()
        for colour, frames, pos in PEOPLE.values():
            if i not in frames:
                continue
            x, y = pos(i)
            cv2.rectangle(frame, (x + 5, y), (x + 25, y + 18), colour, -1)  # head
            cv2.rectangle(frame, (x, y + 18), (x + 29, y + 79), colour, -1)  # body
        if i in (10, 11):
            cv2.rectangle(frame, (250, 30), (280, 90), (0, 220, 220), -1)
        writer.write(frame)
    writer.release()
    return path


def colour_detector(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Stand-in detector: the saturated blobs of a frame (the people, the flash) as boxes, conf 0.9."""
    out = []
    for f in frames:
        hsv = cv2.cvtColor(f, cv2.COLOR_BGR2HSV)
        mask = ((hsv[:, :, 1] > 120) & (hsv[:, :, 2] > 80)).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        st = stats[1:][stats[1:, cv2.CC_STAT_AREA] > 100]
        x, y, w, h = (st[:, k].astype(np.float32) for k in range(4))
        out.append(np.stack([x, y, x + w, y + h, np.full_like(x, 0.9)], axis=1).reshape(-1, 5))
    return out


def colour_embed(crops: list[np.ndarray]) -> np.ndarray:
    """Stand-in ReID model: the mean RGB colour of the crop's saturated pixels, L2-normalised."""
    feats = []
    for c in crops:
        sat = cv2.cvtColor(c, cv2.COLOR_RGB2HSV)[:, :, 1] > 120
        feats.append(c[sat].mean(axis=0) if sat.any() else np.ones(3))
    x = np.asarray(feats, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def synthetic_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "cam.avi")


def test_decode_frame_times(synthetic_video):
    info = probe_video(synthetic_video)
    assert (info.fps, info.width, info.height) == (FPS, W, H)
    frames = list(iter_frames(synthetic_video, every=3, start=100.0))
    assert [f.index for f in frames] == list(range(0, N, 3))
    assert frames[5].time == pytest.approx(100.0 + 15 / FPS)
    assert frames[0].image.shape == (H, W, 3) and frames[0].image.dtype == np.uint8


@pytest.mark.parametrize("every", [1, 3])
def test_synthetic_people_give_one_tracklet_each(synthetic_video, every):
    seen = []
    result = ingest_video(synthetic_video, colour_detector, colour_embed, camera=4, start=1000.0, every=every,
                          progress=False, keep_crops=True, on_frame=lambda f, ids, boxes: seen.append(len(ids)))
    tls = result.tracklets
    # three people, one tracklet each; the two-frame flash is dropped (too short a track)
    assert len(tls) == 3, [(t.track_id, t.first_frame, t.last_frame) for t in tls]
    assert len(seen) == result.stats.sampled == len(range(0, N, every)) and result.stats.decoded == N
    for t, name in zip(tls, ["red", "green", "blue"]):  # ordered by first frame
        first, last = visible_frames(name)
        assert t.camera == 4
        # a sliver narrower than 8 px may or may not be detected (JPEG bleeds colour into the background)
        assert first - 2 <= t.first_frame <= first + 2 * every, (name, t.first_frame)
        assert last - 2 * every <= t.last_frame <= last + 2, (name, t.last_frame)
        assert t.start == pytest.approx(1000.0 + t.first_frame / FPS)
        assert t.end == pytest.approx(1000.0 + t.last_frame / FPS)
        assert t.crop_count == len(t.crops) == 8 == len(t.crop_features)
        # the best crops are whole people (not cut by the frame edge): 80x30 with the detector's slack
        for c in t.crops:
            assert abs(c.shape[0] - 80) <= 3 and abs(c.shape[1] - 30) <= 3, c.shape
        rgb = t.thumbnail.reshape(-1, 3).mean(axis=0)
        channel = {"red": 0, "green": 1, "blue": 2}[name]
        assert int(np.argmax(rgb)) == channel  # the thumbnail shows this person (RGB)
        assert int(np.argmax(t.feature)) == channel and np.linalg.norm(t.feature) == pytest.approx(1.0, abs=1e-5)
        assert t.thumbnail_jpeg()[:2] == b"\xff\xd8"
    assert np.isfinite([result.stats.fps(s) for s in ("decode", "detect", "track", "embed")]).all()
    assert "frames/s" in result.stats.summary()


def test_without_embedder_tracklets_carry_no_feature(synthetic_video):
    result = ingest_video(synthetic_video, colour_detector, None, every=2, progress=False)
    assert len(result.tracklets) == 3 and all(t.feature is None and t.crops is None for t in result.tracklets)


def test_aggregate_is_renormalised_mean_of_normalised_features():
    f = np.array([[3.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(aggregate_features(f), [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    with pytest.raises(ValueError):
        aggregate_features(np.zeros((0, 4)))


def test_crop_rule_prefers_whole_then_sharp_boxes():
    rng = np.random.default_rng(1)
    frame = np.full((200, 300, 3), 128, np.uint8)
    frame[20:180, 40:100] = rng.integers(0, 255, (160, 60, 3), dtype=np.uint8)  # sharp texture
    frame[20:180, 140:200] = cv2.GaussianBlur(frame[20:180, 40:100], (0, 0), 6)  # the same, blurred
    frame[20:180, 240:300] = frame[20:180, 40:100]  # sharp but touching the right edge
    assert box_cut_by_edge(np.array([240, 20, 300, 180]), 200, 300, 3)
    assert not box_cut_by_edge(np.array([40, 20, 100, 180]), 200, 300, 3)
    tc = TrackCrops(1, CropRule(max_crops=2))
    tc.add(frame, np.array([240, 20, 300, 180, 0.9]), 0, 0.0)
    tc.add(frame, np.array([140, 20, 200, 180, 0.9]), 1, 0.1)
    tc.add(frame, np.array([40, 20, 100, 180, 0.9]), 2, 0.2)
    best = tc.best()
    assert [b[0] for b in best] == [2, 1] and not any(cut for *_, cut in best)  # cut box dropped first
    assert (tc.first_frame, tc.last_frame, tc.hits) == (0, 2, 3)


@pytest.mark.parametrize("start", [0.0, 1796374800.0])  # 2026-12-04T09:00:00Z: float64 times lose ~1e-7 s there
def test_a_track_of_exactly_the_minimum_duration_is_kept_whatever_the_start(start):
    """The real video's 3-box track at 25 fps, every 5th frame (frames 355-365: 0.4 s) is kept with an ISO start
    as with start 0 (it was dropped at an epoch start: 14.6 - 14.2 came out 0.39999986)."""
    frame = np.random.default_rng(2).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    tc = TrackCrops(1, CropRule(max_crops=2))
    for index in (355, 360, 365):
        tc.add(frame, np.array([40, 20, 100, 180, 0.9]), index, start + index / 25.0)
    assert tc.last_time - tc.first_time < 0.4 or start == 0.0  # the rounding this guards against
    assert [t.first_frame for t in build_tracklets([tc], None, 0, "v")] == [355]
    short = TrackCrops(2, CropRule(max_crops=2))
    for index in (355, 360):
        short.add(frame, np.array([40, 20, 100, 180, 0.9]), index, start + index / 25.0)
    short.add(frame, np.array([40, 20, 100, 180, 0.9]), 362, start + 362 / 25.0)
    assert build_tracklets([short], None, 0, "v") == []  # 0.28 s: still too short


def test_extractor_embedder_passes_camera_and_normalises():
    calls = []

    def fake_extractor(images, camids=None):
        calls.append(camids)
        return np.stack([np.full(4, float(i + 1)) for i in range(len(images))])

    embed = extractor_embedder(fake_extractor, camera=2)
    out = embed([np.zeros((8, 4, 3), np.uint8)] * 3)
    assert calls == [[2, 2, 2]] and out.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- an SSD-style ONNX detector


def ssd_onnx(path: Path, h: int = 64, w: int = 96) -> Path:
    """An ONNX 'detector' of the documented shape: input [N, 3, h, w]; output [1, 1, N + 3, 7]: one box
    per image (label 1, conf 0.9, corners 0.1 0.2 0.3 0.8), a low-confidence row, the -1 end row and one
    row after it that must be ignored."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def const(name, arr):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr), name))

    nodes = [
        helper.make_node("Shape", ["data"], ["shape"]),
        const("zero", np.array([0], np.int64)), const("one", np.array([1], np.int64)),
        helper.make_node("Slice", ["shape", "zero", "one"], ["n1"]),
        helper.make_node("Squeeze", ["n1"], ["n"]),
        const("z", np.array(0, np.int64)), const("s", np.array(1, np.int64)),
        helper.make_node("Range", ["z", "n", "s"], ["ids_i"]),
        helper.make_node("Cast", ["ids_i"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "one"], ["ids"]),
        const("tail", np.array([[1, 0.9, 0.1, 0.2, 0.3, 0.8]], np.float32)),
        const("six", np.array([6], np.int64)),
        helper.make_node("Concat", ["n1", "six"], ["tshape"], axis=0),
        helper.make_node("Expand", ["tail", "tshape"], ["tails"]),
        helper.make_node("Concat", ["ids", "tails"], ["rows"], axis=1),
        const("extra", np.array([[0, 1, 0.2, 0.5, 0.5, 0.6, 0.6], [-1, 0, 0, 0, 0, 0, 0],
                                 [0, 1, 0.99, 0, 0, 1, 1]], np.float32)),
        helper.make_node("Concat", ["rows", "extra"], ["all"], axis=0),
        const("oshape", np.array([1, 1, -1, 7], np.int64)),
        helper.make_node("Reshape", ["all", "oshape"], ["detection_out"]),
    ]
    graph = helper.make_graph(nodes, "ssd_stub", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                                ["N", 3, h, w])],
                              [helper.make_tensor_value_info("detection_out", TensorProto.FLOAT, [1, 1, None, 7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_parse_ssd_output_stops_at_padding_and_scales():
    rows = np.array([[0, 1, 0.9, 0.1, 0.1, 0.5, 0.9], [1, 1, 0.7, 0, 0, 1.2, 1], [0, 1, 0.3, 0, 0, 1, 1],
                     [-1, 0, 0, 0, 0, 0, 0], [1, 1, 0.99, 0, 0, 1, 1]], np.float32)
    a, b = parse_ssd_output(rows[None, None], [(100, 200), (50, 60)], threshold=0.5)
    np.testing.assert_allclose(a, [[20, 10, 100, 90, 0.9]], rtol=1e-6)
    np.testing.assert_allclose(b, [[0, 0, 60, 50, 0.7]], rtol=1e-6)  # clipped to the frame
    assert parse_ssd_output(rows, [(10, 10)], 0.5, labels=[2])[0].shape == (0, 5)


def test_onnx_detector_batches_frames(tmp_path):
    pytest.importorskip("openvino")
    det = SSDDetector(ssd_onnx(tmp_path / "det.onnx"), threshold=0.5, batch_size=2)
    frames = [np.full((100, 200, 3), v, np.uint8) for v in (10, 20, 30)]  # 2 + 1 (padded) inferences
    boxes = det(frames)
    assert len(boxes) == 3
    for b in boxes:
        np.testing.assert_allclose(b, [[20, 20, 60, 80, 0.9]], rtol=1e-5)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_or_unreadable_inputs_give_one_clear_error(tmp_path, synthetic_video):
    with pytest.raises(FileNotFoundError, match="video not found"):
        ingest_video(tmp_path / "nope.mp4", colour_detector, progress=False)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot open video"):
        ingest_video(junk, colour_detector, progress=False)
    with pytest.raises(FileNotFoundError, match="detector not found"):
        SSDDetector(tmp_path / "missing.xml")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DetectorError, match="cannot read detector"):
        SSDDetector(bad)
    xml = tmp_path / "bad.xml"
    xml.write_text("<net>", encoding="utf-8")
    xml.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(DetectorError, match="cannot read detector"):
        SSDDetector(xml)
    with pytest.raises(DetectorError, match="expected an OpenVINO IR"):
        SSDDetector(synthetic_video)
    with pytest.raises(ValueError, match="every"):
        ingest_video(synthetic_video, colour_detector, every=0, progress=False)


def _tool():
    spec = importlib.util.spec_from_file_location("ingest_video_tool", ROOT / "tools" / "ingest_video.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tool_prints_tracklets_and_writes_thumbnails(tmp_path, synthetic_video, capsys):
    pytest.importorskip("openvino")
    tool = _tool()
    det = ssd_onnx(tmp_path / "det.onnx")  # one still box in every frame: one tracklet over the whole video
    rc = tool.main([str(synthetic_video), "--detector", str(det), "--every", "4", "--start", "50",
                    "--camera", "2", "--thumbnails", str(tmp_path / "thumbs"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1 tracklets" in out and "frames/s" in out
    assert " 50.00 " in out and " 61.60 " in out  # frames 0 and 116 of 10 fps from --start 50
    assert [p.name for p in (tmp_path / "thumbs").iterdir()] == ["cam_t1.jpg"]


@pytest.mark.parametrize("case", ["missing video", "bad detector", "thumbnails is a file", "bad start"])
def test_tool_bad_input_is_one_error_line(tmp_path, synthetic_video, capsys, case):
    tool = _tool()
    det = tmp_path / "det.onnx"
    det.write_bytes(b"junk")
    afile = tmp_path / "file.txt"
    afile.write_text("x", encoding="utf-8")
    args = {
        "missing video": [str(tmp_path / "none.mp4"), "--detector", str(det)],
        "bad detector": [str(synthetic_video), "--detector", str(det)],
        "thumbnails is a file": [str(synthetic_video), "--detector", str(det), "--thumbnails", str(afile)],
        "bad start": [str(synthetic_video), "--detector", str(det), "--start", "yesterday"],
    }[case]
    assert tool.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err


# ----------------------------------------------------------------------------- the real video


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real video folder absent: {REAL}")
def test_real_video_tracklets_match_the_passes_seen_by_eye():
    """people-detection.264 with pedestrian-detection-adas-0002, every 5th frame, threshold 0.5.

    Checked by eye once (frames with the track ids drawn, and the thumbnails): the video has four passes
    with 1, 2, 3 and 1 people (pass 3: the README's "four in frame 365" counts a duplicate box; three
    people are in the room). Found, in frames: 30-65 (pass 1, the woman walking to the right-hand
    window), 190-220 and 195-245 (pass 2, a woman in a grey skirt and a man in black; the man's track takes
    over the woman in its last frames, 240-245, as both leave by the left door, and its thumbnail, from
    frame 240, shows her: an ID switch of ByteTrack at every 5th frame, not caught here), 355-395, 355-365 and
    365-400 (pass 3: the man in the checked shirt, the woman in black - lost after 365 when the detector
    boxes her together with her neighbour or below 0.6 - and the man in the white shirt and hat), 530-550
    (pass 4, a man in a grey cap, light-blue shirt and khaki trousers: by his clothes not pass 3's man in the
    straw hat, white shirt and dark trousers; and pass 3's dark-haired woman is not pass 1's blonde one).
    The false box at the right-hand wall (conf 0.5-0.66, in nearly
    every frame) starts no track (ByteTrack starts tracks above activation + 0.1 = 0.7).
    """
    pytest.importorskip("openvino")
    result = ingest_video(REAL / "people-detection.264", REAL / "pedestrian-detection-adas-0002.xml", every=5,
                          threshold=0.5, camera=0, progress=False)
    tls = result.tracklets
    assert result.info.fps == 25.0 and result.stats.decoded == 596 and result.stats.sampled == 120
    passes = [(20, 70), (185, 250), (345, 405), (525, 560)]
    per_pass = [[t for t in tls if a <= t.first_frame and t.last_frame <= b] for a, b in passes]
    spans = [(t.first_frame, t.last_frame) for t in tls]
    assert [len(p) for p in per_pass] == [1, 2, 3, 1], spans
    assert len(tls) == 7, spans
    for t in tls:
        assert t.start == pytest.approx(t.first_frame / 25.0) and t.crop_count >= 3
        assert t.thumbnail.shape[0] > 150  # a whole person (the boxes are 200-330 px high)
    # the longer passes last as seen: pass 1 about 1.2-2.6 s, pass 4 about 21.2-22.0 s
    assert per_pass[0][0].start == pytest.approx(1.2, abs=0.25) and per_pass[0][0].end == pytest.approx(2.6, abs=0.25)
    assert per_pass[3][0].start == pytest.approx(21.2, abs=0.25) and per_pass[3][0].end == pytest.approx(22.0, abs=0.25)
