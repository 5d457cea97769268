"""Uploads to `reid-gallery serve`: the request body under a size limit, decoding an image safely, the
query's camera, and storing an uploaded crop in the gallery (POST /api/crops)."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..data.loader import CropShapeError, check_crop_shape, to_rgb
from .crops import cameras_from_names, to_seconds
from .gallery import Gallery
from .live import LiveGallery
from .store import CropRecord

__all__ = ["FORMATS", "UPLOADS", "add_upload", "camera_from_name", "check_query_camera", "decode_upload",
           "read_body"]

#: Folder of the gallery where crops added through the API are kept (named by their sha256).
UPLOADS = "uploads"
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp"}  # uploads the gallery's crop reader accepts
#: The longest file name the file systems take (bytes): a longer `filename=` cannot name a crop.
MAX_NAME_BYTES = 255
_MAX_PIXELS = 40_000_000  # a person crop is far smaller; refuses decompression bombs before decoding


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (declared or streamed)."""
    too_big = f"upload larger than the server's limit of {limit / 2**20:g} MB (--max-upload-mb)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, too_big)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HTTPException(413, too_big)
    if not data:
        raise HTTPException(400, "empty request body: send the image file's bytes as the body")
    return bytes(data)


def decode_upload(data: bytes) -> tuple[Any, str]:
    """(RGB PIL image, format) of uploaded bytes; 400/415 for what is not a readable crop."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > _MAX_PIXELS:
            raise HTTPException(400, f"image of {img.width}x{img.height} pixels is too large for a person crop")
        check_crop_shape(img.width, img.height, "the upload")  # the rule every reader of crops applies
        img.load()
    except CropShapeError as exc:
        raise HTTPException(400, str(exc)) from None
    except HTTPException:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise HTTPException(400, f"the upload is not a readable image ({exc})") from None
    if img.format not in FORMATS:
        raise HTTPException(415, f"unsupported image format {img.format}: send JPEG, PNG or BMP")
    return to_rgb(img), img.format  # 16-bit and palette PNGs are scaled to 8-bit RGB, as files are


def camera_from_name(g: Gallery, data: bytes, filename: str | None, fmt: str) -> int | None:
    """The camera the gallery's file-name pattern reads from `filename` (only its base name is used)."""
    name = Path(filename or "").name
    if not name or name in (".", ".."):
        return None
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:  # writing it below would fail with ENAMETOOLONG (a 500)
        raise HTTPException(400, f"filename of {size} bytes is longer than a file name can be "
                                 f"({MAX_NAME_BYTES} bytes)")
    if "\0" in name:
        raise HTTPException(400, "filename contains a NUL character")
    with tempfile.TemporaryDirectory(prefix="reid-serve-") as tmp:
        path = Path(tmp) / (name if Path(name).suffix.lower() in FORMATS.values() else name + FORMATS[fmt])
        path.write_bytes(data)
        return cameras_from_names([str(path)], g.pattern)[0]


def check_query_camera(g: Gallery, camera: int | None) -> int | None:
    """`camera`, after checking it against a camera-SIE model's table (400 when missing or outside)."""
    if g.fingerprint["architecture"]["sie_camera"]:
        if camera is None:
            raise HTTPException(400, "this gallery's model has a camera SIE: give the query's camera (camera=N, "
                                     "0-based) or a filename= that the gallery's file-name pattern parses")
        if not 0 <= camera < g.camera_num:
            raise HTTPException(400, f"camera {camera} is outside the model's SIE table (0..{g.camera_num - 1})")
    return camera


def add_upload(live: LiveGallery, data: bytes, fmt: str, camera: int | None, timestamp: str | None,
                identity: int | None, filename: str | None) -> dict[str, Any]:
    """Store an uploaded crop under <gallery>/uploads/<sha256>.<ext> and add it (a new generation)."""
    g = live.current()
    if camera is None:
        camera = camera_from_name(g, data, filename, fmt)
    check_query_camera(g, camera)
    sha = hashlib.sha256(data).hexdigest()
    if live.root is None:
        raise HTTPException(403, f"this gallery ({live.storage.location}) has no folder of its own to keep uploaded "
                                 "crops in; add crops with `reid-gallery add` instead")
    folder = live.root / UPLOADS
    folder.mkdir(exist_ok=True)
    path = folder / f"{sha}{FORMATS[fmt]}"
    existed = path.exists()
    if not existed:  # written whole, then renamed: an interrupted upload never leaves a partial crop
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{sha}.", suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    record = CropRecord(path=str(path), sha256="", camid=camera, timestamp=to_seconds(timestamp),
                        timestamp_raw=timestamp, identity=identity)
    writer = live.writer()
    try:
        report = writer.add([record], lock_timeout=60.0)
        crop_id = writer.store.ids_of_hashes([sha]).get(sha)
    except BaseException:
        if not existed:
            path.unlink(missing_ok=True)
        raise
    finally:
        writer.close()
    if not report.added and not existed:
        path.unlink(missing_ok=True)  # the same bytes were already stored under another file
    live.current()  # serve the new generation from now on
    return {"added": report.added, "duplicate": bool(report.duplicates), "id": crop_id,
            "generation": report.generation}
