"""Tests for reid_lite.data: dataset layouts, sidecars, transforms, robust loading, P x K sampling.

All datasets are tiny fakes written to tmp_path in the published layouts; one test copies a few
real CUHK03 crops (Market layout) from /work/shared/data when they are present.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from reid_lite.config import get_cfg
from reid_lite.data import (
    MSMT17,
    Batch,
    DatasetLayoutError,
    DukeMTMCreID,
    FolderDataset,
    ImageDataset,
    ImageReadWarning,
    Market1501,
    RandomIdentitySampler,
    ReIDCollate,
    SidecarError,
    build_dataset,
    build_dataset_from_cfg,
    build_test_loader,
    build_train_loader,
    build_transforms,
    read_image,
)

CUHK03 = Path("/work/shared/data/cuhk03")
MARKET_DIRS = ("bounding_box_train", "query", "bounding_box_test")


def write_image(path: Path, color=(120, 60, 30), size=(8, 16), mode="RGB", fmt=None) -> Path:
    """A small solid image (size is W x H); `mode` 'L', 'RGBA' or 'P' for the conversion tests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[...] = color[:3]
    img = Image.fromarray(arr, "RGB")
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.new("L", img.size, color[3] if len(color) > 3 else 128))
    elif mode == "P":
        img = img.convert("P")
    img.save(path, format=fmt)
    return path


def make_market(root: Path, train, query, gallery, dataset_dir="market1501") -> Path:
    base = root / dataset_dir
    for sub, names in zip(MARKET_DIRS, (train, query, gallery), strict=True):
        (base / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_image(base / sub / name)
    return base


def small_cfg(**over):
    cfg = get_cfg()
    cfg.INPUT.SIZE_TEST = [16, 8]
    cfg.INPUT.SIZE_TRAIN = [16, 8]
    cfg.INPUT.PADDING = 2
    cfg.TEST.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    for key, value in over.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


# ----------------------------------------------------------------------------- Market / Duke

MARKET_TRAIN = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s3_015187_02.jpg",
                "0007_c3s3_015188_02.jpg", "0010_c6s4_002452_01.jpg"]
MARKET_QUERY = ["0001_c1s1_001051_00.jpg", "0003_c5s1_000701_00.jpg"]
MARKET_GALLERY = ["-1_c1s1_000401_03.jpg", "0000_c4s2_000001_01.jpg", "0001_c2s1_000476_03.jpg",
                  "0003_c6s2_000101_02.jpg"]


def test_market1501_parses_ids_cameras_and_relabels(tmp_path):
    base = make_market(tmp_path, MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY)
    (base / "query" / "Thumbs.db").write_bytes(b"not an image")  # non-jpg files are ignored
    ds = build_dataset("market1501", root=tmp_path)
    assert isinstance(ds, Market1501)
    tr = base / "bounding_box_train"
    assert ds.train == [
        (str(tr / "0002_c1s1_000451_03.jpg"), 0, 0, 0),
        (str(tr / "0002_c2s1_000301_01.jpg"), 0, 1, 0),
        (str(tr / "0007_c3s3_015187_02.jpg"), 1, 2, 0),
        (str(tr / "0007_c3s3_015188_02.jpg"), 1, 2, 0),
        (str(tr / "0010_c6s4_002452_01.jpg"), 2, 5, 0),
    ]
    # query/gallery keep the original pids; junk (-1) is dropped, distractors (0) are kept
    assert [(Path(p).name, pid, cam) for p, pid, cam, _ in ds.query] == [
        ("0001_c1s1_001051_00.jpg", 1, 0), ("0003_c5s1_000701_00.jpg", 3, 4)]
    assert [(pid, cam) for _, pid, cam, _ in ds.gallery] == [(0, 3), (1, 1), (3, 5)]
    assert (ds.num_train_pids, ds.num_train_imgs, ds.num_train_cams, ds.num_train_vids) == (3, 5, 4, 1)
    assert (ds.num_query_pids, ds.num_query_cams) == (2, 2)
    assert (ds.num_gallery_pids, ds.num_gallery_imgs, ds.num_gallery_cams) == (3, 3, 3)
    expected_table = [
        "=> Loaded Market1501",
        "  ----------------------------------------",
        "  subset   | # ids | # images | # cameras",
        "  ----------------------------------------",
        "  train    |     3 |        5 |         4",
        "  query    |     2 |        2 |         2",
        "  gallery  |     3 |        3 |         3",
        "  ----------------------------------------",
    ]
    assert ds.statistics_table().splitlines() == expected_table


def test_market_alternative_folder_name_and_print(tmp_path, capsys):
    make_market(tmp_path, MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY, dataset_dir="Market-1501-v15.09.15")
    ds = Market1501(root=str(tmp_path), verbose=True)
    assert ds.dataset_dir == str(tmp_path / "Market-1501-v15.09.15")
    out = capsys.readouterr().out
    assert "  train    |     3 |        5 |         4" in out


def test_missing_layout_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetLayoutError) as exc:
        build_dataset("market1501", root=tmp_path)
    assert isinstance(exc.value, FileNotFoundError)
    msg = str(exc.value)
    assert f"{tmp_path}/market1501/{{bounding_box_train,query,bounding_box_test}}" in msg
    assert "datasets/README.md" in msg
    # a partial layout (no query folder) names the dataset folder and the folder that is missing
    (tmp_path / "market1501" / "bounding_box_train").mkdir(parents=True)
    (tmp_path / "market1501" / "bounding_box_test").mkdir()
    with pytest.raises(DatasetLayoutError) as exc:
        build_dataset("market1501", root=tmp_path)
    assert str(exc.value).startswith(f"Market1501 at {tmp_path / 'market1501'} is incomplete: missing folder(s) "
                                     "query (found bounding_box_train, bounding_box_test")
    with pytest.raises(DatasetLayoutError, match=r"MSMT17_V1"):
        build_dataset("msmt17", root=tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"DukeMTMC-reID/\{bounding_box_train"):
        build_dataset("dukemtmcreid", root=tmp_path)


def test_malformed_market_file_name_and_empty_query(tmp_path):
    base = make_market(tmp_path, MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY)
    write_image(base / "query" / "person_a.jpg")
    with pytest.raises(DatasetLayoutError, match="person_a.jpg"):
        build_dataset("market1501", root=tmp_path)
    shutil.rmtree(base / "query")
    (base / "query").mkdir()
    with pytest.raises(DatasetLayoutError, match="no query images"):
        build_dataset("market1501", root=tmp_path)


def test_dukemtmcreid(tmp_path):
    make_market(tmp_path, ["0005_c2_f0046985.jpg", "0008_c8_f0005541.jpg"], ["0001_c2_f0046182.jpg"],
                ["0001_c5_f0051341.jpg", "0003_c8_f0000001.jpg"], dataset_dir="DukeMTMC-reID")
    ds = build_dataset("duke", root=tmp_path)
    assert isinstance(ds, DukeMTMCreID)
    assert [r[1:] for r in ds.train] == [(0, 1, 0), (1, 7, 0)]
    assert [r[1:] for r in ds.gallery] == [(1, 4, 0), (3, 7, 0)]


def test_dataset_dir_override_and_cfg(tmp_path):
    make_market(tmp_path, MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY, dataset_dir="cuhk03")
    ds = build_dataset("market1501", root=tmp_path, dataset_dir="cuhk03")
    assert ds.name == "Market1501[cuhk03]" and ds.num_train_pids == 3
    assert build_dataset("cuhk03", root=tmp_path).train == ds.train
    cfg = small_cfg(**{"DATASETS.NAMES": "cuhk03", "DATASETS.ROOT_DIR": str(tmp_path)})
    assert build_dataset_from_cfg(cfg).query == ds.query
    with pytest.raises(KeyError, match="unknown dataset 'viper'"):
        build_dataset("viper", root=tmp_path)


# ----------------------------------------------------------------------------- MSMT17

def make_msmt(base: Path, train_dir: str, test_dir: str) -> None:
    lists = {
        "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                           ("0000/0000_001_05_0303morning_0016_1.jpg", 0),
                           ("0002/0002_000_15_0303noon_0100_0.jpg", 2)],
        # val: more images of training identities (same label space), incl. one only in val
        "list_val.txt": [("0002/0002_003_07_0303noon_0101_2.jpg", 2),
                         ("0001/0001_000_03_0303afternoon_0010_0.jpg", 1)],
        "list_query.txt": [("0000/0000_000_12_0113morning_0020_0.jpg", 0)],
        "list_gallery.txt": [("0000/0000_001_02_0113noon_0500_1.jpg", 0),
                             ("0005/0005_000_09_0113noon_0501_0.jpg", 5)],
    }
    for list_name, entries in lists.items():
        folder = base / (train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir)
        for rel, _ in entries:
            write_image(folder / rel)
        (base / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))


@pytest.mark.parametrize("version,subdir,train_dir,test_dir", [
    ("V1", "MSMT17_V1", "train", "test"),
    ("V2", "msmt17/MSMT17_V2", "mask_train_v2", "mask_test_v2"),
])
def test_msmt17_versions(tmp_path, version, subdir, train_dir, test_dir):
    base = tmp_path / subdir
    make_msmt(base, train_dir, test_dir)
    ds = build_dataset("msmt17", root=tmp_path)
    assert isinstance(ds, MSMT17) and ds.version == version
    assert ds.train[0] == (str(base / train_dir / "0000/0000_000_01_0303morning_0015_0.jpg"), 0, 0, 0)
    # train = list_train + list_val, relabelled over the union: pids 0, 1, 2 -> 0, 1, 2
    assert [r[1:] for r in ds.train] == [(0, 0, 0), (0, 4, 0), (2, 14, 0), (2, 6, 0), (1, 2, 0)]
    assert ds.query == [(str(base / test_dir / "0000/0000_000_12_0113morning_0020_0.jpg"), 0, 11, 0)]
    assert [r[1:] for r in ds.gallery] == [(0, 1, 0), (5, 8, 0)]
    assert (ds.num_train_pids, ds.num_train_imgs, ds.num_train_cams) == (3, 5, 5)
    other = "V2" if version == "V1" else "V1"
    with pytest.raises(DatasetLayoutError):
        build_dataset(f"msmt17_{other.lower()}", root=tmp_path)


def test_msmt17_bad_list_line_names_file_and_line(tmp_path):
    base = tmp_path / "MSMT17_V1"
    make_msmt(base, "train", "test")
    with open(base / "list_gallery.txt", "a") as fh:
        fh.write("0007/badname.jpg 7\n")
    with pytest.raises(DatasetLayoutError, match=r"list_gallery.txt line 3: malformed entry"):
        build_dataset("msmt17", root=tmp_path)


# ----------------------------------------------------------------------------- folder + sidecars

def make_crops(folder: Path) -> None:
    write_image(folder / "cam1" / "a.jpg")
    write_image(folder / "cam1" / "b.png", fmt="PNG")
    write_image(folder / "c.jpg")


def test_folder_csv_sidecar(tmp_path):
    folder = tmp_path / "crops"
    make_crops(folder)
    (folder / "meta.csv").write_text(
        "path,camid,pid,timestamp,extra\n"
        "cam1/a.jpg,0,17,1700000000.5,x\n"
        "cam1/b.png,0,,2024-01-02T03:04:05,y\n"
        "c.jpg,3,-1,,z\n")
    ds = build_dataset("folder", root=folder, sidecar="meta.csv")
    assert isinstance(ds, FolderDataset) and ds.train == [] and ds.query == []
    assert ds.gallery == [(str(folder / "cam1/a.jpg"), 17, 0, 0), (str(folder / "cam1/b.png"), -1, 0, 0),
                          (str(folder / "c.jpg"), -1, 3, 0)]
    assert ds.timestamps == {str(folder / "cam1/a.jpg"): 1700000000.5,
                             str(folder / "cam1/b.png"): "2024-01-02T03:04:05"}
    # unlabelled crops are not identities; cameras 0 and 3
    assert (ds.num_gallery_pids, ds.num_gallery_imgs, ds.num_gallery_cams) == (1, 3, 2)


@pytest.mark.parametrize("as_dict", [False, True])
def test_folder_json_sidecar(tmp_path, as_dict):
    folder = tmp_path / "crops"
    make_crops(folder)
    entries = [{"path": "c.jpg", "camid": 2, "pid": 5, "timestamp": 12},
               {"path": "cam1/a.jpg", "camid": 1}]
    data = {e.pop("path"): e for e in entries} if as_dict else entries
    sidecar = tmp_path / "side.json"  # the sidecar may live outside the folder
    sidecar.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="1 image"):  # b.png is not listed
        ds = FolderDataset(folder, sidecar=sidecar, split="query")
    assert ds.query == [(str(folder / "c.jpg"), 5, 2, 0), (str(folder / "cam1/a.jpg"), -1, 1, 0)]
    assert ds.timestamps == {str(folder / "c.jpg"): 12.0}


@pytest.mark.parametrize("content,where,what", [
    ("path,camid\ncam1/a.jpg,0\n../outside.jpg,1\n", "line 3", "outside the folder"),
    ("path,camid\ncam1/a.jpg,zero\n", "line 2", "'camid' must be an integer"),
    ("path,camid\ncam1/missing.jpg,0\n", "line 2", "does not exist"),
    ("path,pid\ncam1/a.jpg,0\n", "line 1", r"required column\(s\) \['camid'\]"),
    ("path,camid\nc.jpg,0\nc.jpg,1\n", "line 3", "duplicate"),
    (b"path,camid\ncam1/a.jpg,0\nc\xe9.jpg,1\n", "line 3", r"not UTF-8 text \(byte b'\\xe9'\)"),
    ("path,camid\ncam1/a.jpg,0\nc.jpg,1,2\n", "line 3", r"3 fields, but the header has 2 \(extra \['2'\]\)"),
    ("path,camid,timestamp\ncam1/a.jpg,0,nan\n", "line 2", "timestamp 'nan' is not a finite number"),
    ("path,camid,timestamp\ncam1/a.jpg,0,1e400\n", "line 2", "timestamp '1e400' is not a finite number"),
])
def test_folder_bad_sidecar(tmp_path, content, where, what):
    folder = tmp_path / "crops"
    make_crops(folder)
    write_image(tmp_path / "outside.jpg")  # exists, so only the escape check can reject it
    if isinstance(content, bytes):
        (folder / "bad.csv").write_bytes(content)
    else:
        (folder / "bad.csv").write_text(content)
    with pytest.raises(SidecarError, match=rf"bad\.csv: {where}: .*{what}"):
        build_dataset("folder", root=folder, sidecar="bad.csv")


def test_folder_sidecar_with_a_byte_order_mark(tmp_path):
    """Excel and Notepad save UTF-8 with a BOM: the header's first column is still `path`."""
    folder = tmp_path / "crops"
    make_crops(folder)
    (folder / "bom.csv").write_bytes(b"\xef\xbb\xbfpath,camid\ncam1/a.jpg,0\nc.jpg,2\n")
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"path": "c.jpg", "camid": 1}]).encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unlisted crops
        assert [cam for _, _, cam, _ in FolderDataset(folder, sidecar="bom.csv").gallery] == [0, 2]
        assert [cam for _, _, cam, _ in FolderDataset(folder, sidecar="bom.json").gallery] == [1]


def test_folder_json_escape_is_rejected(tmp_path):
    folder = tmp_path / "crops"
    make_crops(folder)
    write_image(tmp_path / "outside.jpg")
    (folder / "s.json").write_text(json.dumps([{"path": "c.jpg", "camid": 0},
                                               {"path": str(tmp_path / "outside.jpg"), "camid": 0}]))
    with pytest.raises(SidecarError, match=r"s\.json: entry 1: .*outside the folder"):
        FolderDataset(folder, sidecar="s.json")


def test_folder_pattern(tmp_path):
    folder = tmp_path / "crops"
    for name in ("0004_c2s1_000001_00.jpg", "-1_c1s1_000002_00.jpg", "sub/0009_c3_x.png"):
        write_image(folder / name)
    ds = build_dataset("folder", root=tmp_path, dataset_dir="crops")  # default FOLDER_PATTERN
    assert [(Path(p).name, pid, cam) for p, pid, cam, _ in ds.gallery] == [
        ("-1_c1s1_000002_00.jpg", -1, 0), ("0004_c2s1_000001_00.jpg", 4, 1), ("0009_c3_x.png", 9, 2)]
    ds = FolderDataset(folder, pattern=r"c(?P<camid>\d)", cam_base=0, split="gallery")
    assert [(pid, cam) for _, pid, cam, _ in ds.gallery] == [(-1, 1), (-1, 2), (-1, 3)]
    with pytest.raises(ValueError, match="needs a pid for every crop"):
        FolderDataset(folder, split="train")
    write_image(folder / "unnamed.jpg")
    with pytest.raises(DatasetLayoutError, match=r"1 file name\(s\) do not match.*unnamed.jpg"):
        FolderDataset(folder)
    with pytest.raises(ValueError, match="named group 'camid'"):
        FolderDataset(folder, pattern=r"(?P<pid>\d+)")
    with pytest.raises(DatasetLayoutError, match="expected a directory"):
        FolderDataset(tmp_path / "nope")


# ----------------------------------------------------------------------------- transforms

def test_transforms_match_transreid():
    cfg = small_cfg(**{"INPUT.RE_PROB": 0.0, "INPUT.PROB": 0.0})
    test_tf = build_transforms(cfg, is_train=False)
    assert [type(t).__name__ for t in test_tf.transforms] == ["Resize", "ToTensor", "Normalize"]
    assert test_tf.transforms[0].interpolation == T.InterpolationMode.BILINEAR
    img = Image.fromarray(np.full((40, 20, 3), (255, 0, 51), dtype=np.uint8))
    out = test_tf(img)
    assert out.shape == (3, 16, 8) and out.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(cfg.INPUT.PIXEL_MEAN)) / torch.tensor(
        cfg.INPUT.PIXEL_STD)
    torch.testing.assert_close(out[:, 8, 4], expected, atol=1e-5, rtol=0)
    train_tf = build_transforms(cfg, is_train=True)
    assert [type(t).__name__ for t in train_tf.transforms] == [
        "Resize", "RandomHorizontalFlip", "Pad", "RandomCrop", "ToTensor", "Normalize", "RandomErasing"]
    assert train_tf.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert train_tf.transforms[2].padding == 2 and train_tf.transforms[6].probability == 0.0
    assert train_tf(img).shape == (3, 16, 8)


# ----------------------------------------------------------------------------- robust loading

def test_test_loader_skips_corrupt_and_converts_modes(tmp_path):
    base = make_market(tmp_path, MARKET_TRAIN, ["0001_c1s1_000001_00.jpg"], [])
    gal = base / "bounding_box_test"
    write_image(gal / "0001_c2s1_000002_00.jpg", mode="L")
    write_image(gal / "0002_c3s1_000003_00.jpg", color=(10, 200, 30, 0), mode="RGBA", fmt="PNG")
    write_image(gal / "0003_c4s1_000004_00.jpg", color=(0, 0, 255), mode="P", fmt="PNG")
    write_image(gal / "0004_c5s1_000005_00.jpg", color=(255, 255, 255), size=(32, 64))
    corrupt = gal / "0004_c6s1_000006_00.jpg"
    corrupt.write_bytes((gal / "0004_c5s1_000005_00.jpg").read_bytes()[:300])  # truncated JPEG
    ds = build_dataset("market1501", root=tmp_path)
    assert ds.num_gallery_imgs == 5
    cfg = small_cfg(**{"TEST.IMS_PER_BATCH": 3})
    loader, num_query = build_test_loader(cfg, ds)
    assert num_query == 1
    with pytest.warns(ImageReadWarning, match="0004_c6s1_000006_00.jpg"):
        batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert [len(b) for b in batches] == [3, 2]
    assert [b.failed for b in batches] == [[], [str(corrupt)]]
    images = torch.cat([b.images for b in batches])
    assert images.shape == (5, 3, 16, 8) and images.dtype == torch.float32
    assert torch.cat([b.pids for b in batches]).tolist() == [1, 1, 2, 3, 4]
    assert torch.cat([b.camids for b in batches]).tolist() == [0, 1, 2, 3, 4]
    assert torch.cat([b.viewids for b in batches]).tolist() == [0] * 5
    assert torch.cat([b.indices for b in batches]).tolist() == [0, 1, 2, 3, 4]
    assert batches[0].pids.dtype == torch.long

    # Without normalisation the conversions are visible: gray -> 3 equal channels, RGBA's
    # colour kept (alpha dropped), palette -> its RGB colour.
    raw = ImageDataset(ds.gallery, T.ToTensor())
    gray, rgba, pal = raw[0].image, raw[1].image, raw[2].image
    assert gray.shape == (3, 16, 8) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert (rgba[:, 0, 0] * 255).round().tolist() == [10.0, 200.0, 30.0]
    assert (pal[:, 0, 0] * 255).round().tolist() == [0.0, 0.0, 255.0]


def test_high_bit_depth_and_palette_images_become_8bit_rgb(tmp_path):
    """16-bit PNGs (grayscale I;16, RGB 48-bit) are scaled by 257, not clipped to white; palette with
    transparency, LA and CMYK are converted; the same pixels reach a dataset's loader."""
    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(64, 32) * 31).astype(np.uint16)  # 0..63457
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as img:
        assert img.mode.startswith("I")  # what PIL decodes it to: convert("RGB") of this clips to 255
    got = np.asarray(read_image(str(tmp_path / "gray16.png")))
    assert got.shape == (64, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert got.mean() < 150  # the old conversion gave an almost white image (mean 254)
    rgb16 = (np.random.default_rng(0).random((40, 20, 3)) * 65535).astype(np.uint16)
    import cv2
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    got = np.asarray(read_image(str(tmp_path / "rgb16.png"))).astype(int)
    assert np.abs(got - rgb16 / 257.0).max() <= 1
    pal = Image.new("P", (20, 40), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png")
    Image.new("LA", (20, 40), (90, 255)).save(tmp_path / "la.png")
    Image.new("CMYK", (20, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no palette-transparency warning either
        assert np.asarray(read_image(str(tmp_path / "pal.png")))[0, 0].tolist() == [10, 200, 30]
    assert np.asarray(read_image(str(tmp_path / "la.png")))[0, 0].tolist() == [90, 90, 90]
    assert np.asarray(read_image(str(tmp_path / "cmyk.jpg")))[0, 0, 0] > 200  # red stays red
    # The dataset loader reads through read_image: the 16-bit crop is not white there either.
    raw = ImageDataset([(str(tmp_path / "gray16.png"), 1, 0, 0)], T.ToTensor())
    assert float(raw[0].image.mean()) < 0.6


def test_crop_rule_refuses_tiny_and_elongated_images_in_every_reader(tmp_path):
    """MIN_CROP_SIDE and the aspect bounds: read_image raises CropShapeError naming the file and the size,
    the loader skips the crop with that reason, in-memory images are refused the same way."""
    from reid_lite.data import MAX_CROP_ASPECT, MIN_CROP_ASPECT, MIN_CROP_SIDE, CropShapeError, check_crop_shape

    assert (MIN_CROP_SIDE, MIN_CROP_ASPECT, MAX_CROP_ASPECT) == (8, 0.25, 8.0)
    tiny = write_image(tmp_path / "tiny.png", size=(4, 6))
    wide = write_image(tmp_path / "wide.png", size=(200, 20))
    tall = write_image(tmp_path / "tall.png", size=(10, 120))
    ok = write_image(tmp_path / "ok.png", size=(MIN_CROP_SIDE, 2 * MIN_CROP_SIDE))
    with pytest.raises(CropShapeError, match=r"tiny.png is 4x6 pixels .*at least 8 pixels"):
        read_image(str(tiny))
    with pytest.raises(CropShapeError, match=r"wide.png is 200x20 pixels .*height / width 0.1 is outside"):
        read_image(str(wide))
    with pytest.raises(CropShapeError, match=r"tall.png is 10x120 pixels .*height / width 12 is outside"):
        read_image(str(tall))
    assert read_image(str(ok)).size == (8, 16)
    check_crop_shape(64, 128)
    ds = ImageDataset([(str(p), 1, 0, 0) for p in (tiny, ok)], T.ToTensor())
    with pytest.warns(ImageReadWarning, match=r"tiny.png .*CropShapeError.*4x6 pixels"):
        batch = ReIDCollate((16, 8))([ds[0], ds[1]])
    assert batch.failed == [str(tiny)] and batch.paths == [str(ok)]


def test_market_reads_upper_case_extensions_as_reid_gallery_does(tmp_path):
    base = make_market(tmp_path, MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY)
    write_image(base / "bounding_box_test" / "0005_c2s1_000001_00.JPG")
    write_image(base / "query" / "0005_c1s1_000002_00.png")
    ds = build_dataset("market1501", root=tmp_path)
    assert "0005_c2s1_000001_00.JPG" in [Path(p).name for p, *_ in ds.gallery]
    assert "0005_c1s1_000002_00.png" in [Path(p).name for p, *_ in ds.query]


def test_failed_images_warn_once_and_all_failed_batch(tmp_path):
    bad = tmp_path / "0001_c1_bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    records = [(str(bad), 1, 0, 0), (str(tmp_path / "missing.jpg"), 2, 1, 0)]
    ds = ImageDataset(records, T.ToTensor())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[0], ds[1], ds[0], ds[1]]
    assert len([w for w in caught if issubclass(w.category, ImageReadWarning)]) == 2
    batch = ReIDCollate((16, 8))(samples)
    assert len(batch) == 0 and batch.images.shape == (0, 3, 16, 8)
    assert batch.pids.shape == (0,) and batch.pids.dtype == torch.long
    assert batch.failed == [str(bad), str(tmp_path / "missing.jpg")] * 2
    assert ReIDCollate()(samples[:1]).images.shape == (0, 3, 0, 0)


def test_batch_to_and_pin_memory(monkeypatch):
    batch = Batch(torch.ones(2, 3, 4, 2), torch.tensor([5, 6]), torch.tensor([0, 1]), torch.tensor([0, 0]),
                  torch.tensor([3, 4]), ["a.jpg", "b.jpg"], ["c.jpg"])
    moved = batch.to("cpu")
    assert torch.equal(moved.indices, batch.indices) and moved.paths == batch.paths
    assert moved.failed == ["c.jpg"]
    # DataLoader(pin_memory=True) calls Batch.pin_memory(); pinning itself needs CUDA, so fake it
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.shape) or t)
    out = batch.pin_memory()
    assert isinstance(out, Batch) and len(pinned) == 5 and out.paths == ["a.jpg", "b.jpg"]


def test_test_loader_with_worker_processes(tmp_path):
    make_market(tmp_path, MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY)
    ds = build_dataset("market1501", root=tmp_path)
    loader, num_query = build_test_loader(small_cfg(**{"DATALOADER.NUM_WORKERS": 1}), ds)
    paths = [p for b in loader for p in b.paths]
    assert paths == [r[0] for r in ds.query + ds.gallery] and num_query == 2


# ----------------------------------------------------------------------------- sampling

def pk_records(counts: dict[int, int]) -> list[tuple[str, int, int, int]]:
    return [(f"{pid}_{i}.jpg", pid, 0, 0) for pid, n in counts.items() for i in range(n)]


def test_random_identity_sampler_groups():
    records = pk_records({0: 1, 1: 3, 2: 4, 3: 8, 4: 5})
    sampler = RandomIdentitySampler(records, batch_size=8, num_instances=4, seed=3)
    assert len(sampler) == 4 + 4 + 4 + 8 + 4
    epoch0 = list(sampler)
    epoch1 = list(sampler)
    assert epoch0 != epoch1  # the epoch counter advances
    assert len(epoch0) % 8 == 0 and len(epoch0) >= 16
    for order in (epoch0, epoch1):
        pids = [records[i][1] for i in order]
        groups = [pids[g:g + 4] for g in range(0, len(pids), 4)]
        assert all(len(set(g)) == 1 for g in groups)  # K images of one identity per group
        batches = [pids[b:b + 8] for b in range(0, len(pids), 8)]
        assert all(len(set(b)) == 2 for b in batches)  # P = 2 identities per batch
        # identities with >= K images never repeat an image inside a group
        assert all(len({order[g + j] for j in range(4)}) == 4
                   for g in range(0, len(order), 4) if records[order[g]][1] in (2, 3, 4))
    again = RandomIdentitySampler(records, batch_size=8, num_instances=4, seed=3)
    assert list(again) == epoch0
    again.set_epoch(1)
    assert list(again) == epoch1
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(records, batch_size=6, num_instances=4)


def test_train_loader_pk_and_softmax_are_seeded(tmp_path):
    train = [f"{pid:04d}_c{c}s1_{i:06d}_00.jpg" for pid in (1, 2, 3, 4) for c in (1, 2) for i in range(2)]
    make_market(tmp_path, train, MARKET_QUERY, MARKET_GALLERY)
    ds = build_dataset("market1501", root=tmp_path)
    cfg = small_cfg(**{"DATALOADER.SAMPLER": "softmax_triplet", "DATALOADER.NUM_INSTANCE": 2,
                       "SOLVER.IMS_PER_BATCH": 4})
    first = [(b.paths, b.pids.tolist()) for b in build_train_loader(cfg, ds, seed=7)]
    assert len(first) == 4
    for _paths, pids in first:
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]
    assert [(b.paths, b.pids.tolist()) for b in build_train_loader(cfg, ds, seed=7)] == first
    batch = next(iter(build_train_loader(cfg, ds)))
    assert batch.images.shape == (4, 3, 16, 8) and batch.failed == []
    cfg.DATALOADER.SAMPLER = "softmax"
    order = [p for b in build_train_loader(cfg, ds, seed=7) for p in b.paths]
    assert sorted(order) == sorted(r[0] for r in ds.train)
    assert [p for b in build_train_loader(cfg, ds, seed=7) for p in b.paths] == order
    cfg.SOLVER.IMS_PER_BATCH = 10
    cfg.DATALOADER.SAMPLER = "softmax_triplet"
    with pytest.raises(ValueError, match="at least 5 training identities"):
        build_train_loader(cfg, ds)
    cfg.DATALOADER.SAMPLER = "random"
    with pytest.raises(ValueError, match="unsupported DATALOADER.SAMPLER"):
        build_train_loader(cfg, ds)


# ----------------------------------------------------------------------------- real crops

@pytest.mark.skipif(not CUHK03.is_dir(), reason="real CUHK03 crops not available")
def test_market_loader_reads_real_cuhk03_crops(tmp_path):
    base = tmp_path / "market1501"
    picked = {}
    for sub, n in (("query", 5), ("bounding_box_test", 7), ("bounding_box_train", 8)):
        (base / sub).mkdir(parents=True)
        picked[sub] = sorted(p.name for p in (CUHK03 / sub).glob("*.jpg"))[:n]
        for name in picked[sub]:
            shutil.copy(CUHK03 / sub / name, base / sub / name)
    ds = build_dataset("market1501", root=tmp_path)
    assert ds.query[0] == (str(base / "query" / "1001_c1s1_000000_00.jpg"), 1001, 0, 0)
    for sub, records in (("query", ds.query), ("bounding_box_test", ds.gallery)):
        assert [(Path(p).name, pid, cam) for p, pid, cam, _ in records] == [
            (n, int(n[:4]), int(n.split("_")[1][1]) - 1) for n in picked[sub]]
    assert ds.train[0][1] == 0 and ds.num_train_imgs == 8
    loader, num_query = build_test_loader(small_cfg(**{"INPUT.SIZE_TEST": [32, 16],
                                                       "TEST.IMS_PER_BATCH": 8}), ds)
    batches = list(loader)
    assert num_query == 5 and [len(b) for b in batches] == [8, 4]
    assert all(b.failed == [] for b in batches)
    images = torch.cat([b.images for b in batches])
    assert images.shape == (12, 3, 32, 16) and torch.isfinite(images).all()
    assert images.std() > 0.1  # real content, not a blank image
