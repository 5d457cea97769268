"""`reid-gallery serve`: a gallery as an HTTP API (FastAPI) with a single web page on top.

    GET  /                              the web page (reid_lite/index/web/, no build step, no network)
    GET  /api/info                      size, generation, cameras, time span, model, limits, calibration
    POST /api/search                    body: an image; ?k&camera&cameras&time_from&time_to&exclude_same_camera
    GET  /api/crops/{id}/search         the same filters, searching from a stored crop (its stored feature)
    GET  /api/crops/{id}                a crop's metadata
    GET  /api/crops/{id}/thumbnail      a JPEG thumbnail of a stored crop (a tracklet's: its best crop)
    GET  /api/tracklets                 tracklets in time order (?camera&limit)
    GET  /api/tracklets/{id}            a tracklet: camera, start, end, crops, video
    GET  /api/tracklets/{id}/after      where did this person appear next: ?within=20s..10min&k&same_camera&cameras
    POST /api/crops                     add an uploaded crop (only with --allow-add)
    GET  /openapi.json                  the OpenAPI description

`create_app(..., query_cfg=)` (`serve --query-opts`) embeds uploaded queries with the gallery's model
changed in token merging only, for a gallery that accepts merged queries. A search's hits carry
`likely` (score >= the threshold calibrated for the query model, see reid_lite.index.calibration; null
when the gallery is not calibrated) and the answer says whether no hit is likely (`no_likely_match`).

Files are addressed by gallery id only, never by a path from the request, and a thumbnail is served
only when the file still has the content hash the gallery stored. Every error is one JSON object
{"error": "..."} with a 4xx status (5xx only for a fault of the server). Searches run on the
published generation; when a writer publishes a new one, it is opened and swapped in atomically
(`LiveGallery`), and requests in flight finish on the old one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import socket
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..data.loader import to_rgb
from ..utils.text import count
from .crops import to_seconds
from .gallery import Gallery
from .live import LiveGallery
from .querying import SearchHit, SearchResults
from .storage import GalleryCorrupt, GalleryError, GalleryLocked
from .store import CropRecord
from .tracklets import TrackletHit, TrackletRecord, parse_within, search_after, tracklet_table, tracklets_of_hits
from .uploads import UPLOADS, add_upload, camera_from_name, check_query_camera, decode_upload, read_body

logger = logging.getLogger(__name__)

__all__ = ["UPLOADS", "BackgroundServer", "bind", "create_app", "serve"]

_WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css"}  # the page's files: a fixed list
Filters = dict[str, Any]  # keyword arguments of Gallery.search from the query string


def _web_file(name: str) -> bytes:
    return (resources.files("reid_lite.index") / "web" / name).read_bytes()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _hit(h: SearchHit, tracklet: TrackletRecord | None = None) -> dict[str, Any]:
    # The file's location on the server is not part of the answer: a crop is its id (and its base name).
    return {"rank": h.rank, "id": h.id, "score": h.score, **_hit_meta(h), "likely": h.likely,
            "tracklet": _tracklet(tracklet)}


def _tracklet(t: TrackletRecord | None) -> dict[str, Any] | None:
    """What the API tells of a tracklet (None: the entry is a plain crop): span, frames, crops; not the video's
    path on the server."""
    if t is None:
        return None
    d = t.to_dict()
    d["video"] = d["video"][:12]  # the video's key, shortened: which entries come from one video
    return d


def _tracked_hit(h: TrackletHit) -> dict[str, Any]:
    return {**_hit(h.hit, h.tracklet), "start": h.start, "end": h.end}


def _calibration(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a client needs of a calibration entry (no model digests or sources)."""
    if entry is None:
        return None
    keys = ("threshold", "rule", "target_precision", "precision", "recall", "f1", "num_queries", "held_out", "created")
    return {k: entry.get(k) for k in keys}


def _results(g: Gallery, results: SearchResults, query: dict[str, Any], seconds: float) -> dict[str, Any]:
    tracked = tracklets_of_hits(g, results[0]) if results else []
    return {"query": query, "generation": g.generation, "hits": [_tracked_hit(h) for h in tracked],
            "notes": results.notes, "seconds": seconds, "calibration": _calibration(results.calibration),
            "no_likely_match": results.no_likely_match(0) if results else None}


@functools.lru_cache(maxsize=4096)
def _thumbnail(path: str, sha256: str, height: int, mtime_ns: int, size: int) -> bytes:
    """JPEG thumbnail of a stored crop, only if the file still has the bytes the gallery stored (cached
    per file version: the key holds its mtime and size)."""
    from PIL import Image

    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise HTTPException(410, "the crop's file changed on disk since it was added; it is not served")
    img = to_rgb(Image.open(io.BytesIO(data)))  # a 16-bit crop scaled, not clipped to white
    img.thumbnail((height, height), Image.Resampling.BILINEAR)  # person crops are tall: height binds
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


@functools.lru_cache(maxsize=4096)
def _resized(jpeg: bytes, height: int) -> bytes:
    """A stored JPEG (a tracklet's thumbnail) at most `height` pixels high."""
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if img.height <= height:
        return jpeg
    img.thumbnail((height, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def _crop(g: Gallery, crop_id: int) -> CropRecord:
    rec = g.store.get([crop_id]).get(crop_id)
    if rec is None:
        raise HTTPException(404, f"no crop with id {crop_id} in generation {g.generation} of this gallery")
    return rec


#: SQLite's INTEGER range: crop ids and identities beyond it are refused (422) before any query, rather
#: than overflowing inside sqlite3 (a 500).
INT64_MAX = 2**63 - 1
CropId = Annotated[int, PathParam(ge=0, le=INT64_MAX, description="a crop id")]


def search_filters(
        k: Annotated[int, Query(ge=1, le=1000, description="hits to return")] = 10,
        cameras: Annotated[list[int] | None, Query(description="keep only these cameras (0-based)")] = None,
        time_from: Annotated[str | None, Query(description="timestamp >= this (number or ISO 8601)")] = None,
        time_to: Annotated[str | None, Query(description="timestamp <= this")] = None,
        exclude_same_camera: bool = False, nprobe: Annotated[int | None, Query(ge=1, le=1 << 20)] = None) -> Filters:
    """The search filters of the query string (a FastAPI dependency)."""
    bad = [c for c in cameras or [] if not 0 <= c <= INT64_MAX]
    if bad:
        raise HTTPException(400, f"cameras: {bad[0]} is not a camera id (0-based, at most {INT64_MAX})")
    return {"k": k, "cameras": cameras, "time_window": (time_from, time_to),
            "exclude_same_camera": exclude_same_camera, "nprobe": nprobe}


def create_app(gallery: str | os.PathLike | LiveGallery, *, allow_add: bool = False, max_upload_mb: float = 10.0,
               verify: bool = True, device: str | None = None, query_cfg: Any | None = None) -> FastAPI:
    """The FastAPI application serving `gallery` (a directory, opened and verified here, or a LiveGallery).

    allow_add: accept POST /api/crops (read-only otherwise: 403). max_upload_mb: larger request bodies
    get 413. query_cfg: embed uploaded queries with this model (the gallery's own model with token
    merging, for a gallery that accepts merged queries; see LiveGallery)."""
    if max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    live = gallery if isinstance(gallery, LiveGallery) else LiveGallery(gallery, verify=verify, device=device,
                                                                        query_cfg=query_cfg)
    limit = int(max_upload_mb * 2**20)
    app = FastAPI(title="reid-gallery", version="1", docs_url=None, redoc_url=None,  # those load a CDN
                  description="Search a gallery of person crops by image or by crop id. Errors are "
                              '{"error": "one line"} with a 4xx status.')
    app.state.live = live

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ())[1:]) or "request"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, bytes)) else ""
        return _error(422, f"{where}: {e.get('msg', 'invalid')}{got}")

    @app.exception_handler(GalleryLocked)
    async def locked(request: Request, exc: GalleryLocked) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(GalleryCorrupt)
    async def corrupt(request: Request, exc: GalleryCorrupt) -> JSONResponse:
        return _error(500, str(exc))

    @app.exception_handler(ValueError)
    @app.exception_handler(GalleryError)
    async def bad_request(request: Request, exc: Exception) -> JSONResponse:  # FingerprintMismatch included
        return _error(400, str(exc).replace("\n", " "))

    @app.exception_handler(OverflowError)
    async def overflow(request: Request, exc: OverflowError) -> JSONResponse:
        # A number a parameter's bounds let through but SQLite or faiss cannot hold: the request's fault.
        return _error(400, f"a number in the request is out of range ({exc})")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server's log")

    def run_search(g: Gallery, queries: Any, camera: int | None, f: Filters, query: dict[str, Any],
                   query_model: tuple[Any, dict[str, Any]] | None = None) -> dict:
        t0 = time.perf_counter()
        res = g.search(queries, camids=[camera], query_model=query_model, **f)
        return _results(g, res, query, time.perf_counter() - t0)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_web_file("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _WEB_FILES:
            raise HTTPException(404, f"no such file: {name}")
        return Response(_web_file(name), media_type=_WEB_FILES[name])

    @app.get("/api/info", summary="The gallery: size, generation, cameras, time span, model, limits")
    def info() -> dict[str, Any]:
        g = live.current()
        out = {k: v for k, v in g.info().items() if k not in ("path", "manifest")}  # no server paths
        # The threshold of uploaded queries: the one calibrated for the model that embeds them.
        query_fp = None if live.query_model is None else live.query_model[1]
        out["calibration"] = _calibration(g.calibration_for(query_fp))
        out["query_merging"] = (query_fp or g.fingerprint)["merging"]
        span = g.store.time_span()
        out.update(time_span=None if span is None else list(span), has_identity=g.store.has_identity(),
                   camera_num=g.camera_num, tracklets=tracklet_table(g.store).count(),
                   sie_camera=bool(g.fingerprint["architecture"]["sie_camera"]), allow_add=allow_add,
                   max_upload_bytes=limit, reopen_errors=live.reopen_errors[-5:])
        return out

    @app.post("/api/search", summary="Search with an uploaded image (the request body: JPEG, PNG or BMP bytes)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def search_upload(request: Request, f: Annotated[Filters, Depends(search_filters)],
                            camera: Annotated[int | None, Query(ge=0, description="the query's camera")] = None,
                            filename: Annotated[str | None, Query(description="file name to read the camera from")]
                            = None) -> dict[str, Any]:
        data = await read_body(request, limit)

        def work() -> dict[str, Any]:
            img, fmt = decode_upload(data)
            g = live.current()
            cam = camera if camera is not None else camera_from_name(g, data, filename, fmt)
            query = {"camera": cam, "filename": Path(filename).name if filename else None}
            return run_search(g, [img], check_query_camera(g, cam), f, query, live.query_model)
        return await run_in_threadpool(work)

    @app.get("/api/crops/{crop_id}/search", summary="Search from a stored crop (its stored feature and camera)")
    def search_crop(crop_id: CropId, f: Annotated[Filters, Depends(search_filters)]) -> dict[str, Any]:
        g = live.current()
        rec = _crop(g, crop_id)
        return run_search(g, g.crop_features([crop_id]), rec.camid, f, {"id": crop_id, **_hit_meta(rec)})

    @app.get("/api/crops/{crop_id}", summary="A stored crop's metadata")
    def crop(crop_id: CropId) -> dict[str, Any]:
        g = live.current()
        return {"id": crop_id, **_hit_meta(_crop(g, crop_id)), "generation": g.generation}

    @app.get("/api/crops/{crop_id}/thumbnail", summary="JPEG thumbnail of a stored crop",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(crop_id: CropId, height: Annotated[int, Query(ge=16, le=512)] = 128) -> Response:
        g = live.current()
        rec = _crop(g, crop_id)
        jpeg = tracklet_table(g.store).thumbnail(crop_id)
        if jpeg is not None:  # a tracklet's best crop, stored in the gallery
            return Response(_resized(jpeg, height), media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=3600"})
        try:
            st = os.stat(rec.path)
            jpeg = _thumbnail(rec.path, rec.sha256, height, st.st_mtime_ns, st.st_size)
        except OSError:
            raise HTTPException(404, f"crop {crop_id}'s image file is no longer on disk") from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def _tracklet_or_404(g: Gallery, tracklet_id: int) -> TrackletRecord:
        t = tracklet_table(g.store).get([tracklet_id]).get(tracklet_id)
        if t is None:
            raise HTTPException(404, f"no tracklet with id {tracklet_id} in generation {g.generation} of this gallery")
        return t

    @app.get("/api/tracklets", summary="Tracklets in time order (of one camera)")
    def tracklets(camera: Annotated[int | None, Query(ge=0, le=INT64_MAX)] = None,
                  limit: Annotated[int, Query(ge=1, le=10000)] = 500) -> dict[str, Any]:
        g = live.current()
        table = tracklet_table(g.store)
        found = table.list(None if camera is None else [camera], limit)
        recs = g.store.get([t.id for t in found])
        return {"generation": g.generation, "count": table.count(),
                "tracklets": [{**_tracklet(t), **_hit_meta(recs[t.id])} for t in found if t.id in recs]}

    @app.get("/api/tracklets/{tracklet_id}", summary="A stored tracklet: camera, time span, frames, crops")
    def tracklet(tracklet_id: CropId) -> dict[str, Any]:
        g = live.current()
        t = _tracklet_or_404(g, tracklet_id)
        return {**_tracklet(t), **_hit_meta(_crop(g, tracklet_id)), "generation": g.generation}

    @app.get("/api/tracklets/{tracklet_id}/after",
             summary="Where did this tracklet's person appear next: hits on other cameras in time order")
    def after(tracklet_id: CropId,
              within: Annotated[str, Query(description="FROM..TO after the tracklet ends, e.g. 20s..10min")] = "..",
              k: Annotated[int, Query(ge=1, le=1000)] = 10, same_camera: bool = False,
              cameras: Annotated[list[int] | None, Query(description="keep only these cameras")] = None,
              ) -> dict[str, Any]:
        g = live.current()
        q = _tracklet_or_404(g, tracklet_id)
        t0 = time.perf_counter()
        res = search_after(g, tracklet_id, parse_within(within), k, same_camera=same_camera, cameras=cameras)
        out = res.to_dict()
        out.update(query={**_tracklet(q), **_hit_meta(_crop(g, tracklet_id))},
                   hits=[_tracked_hit(h) for h in res.hits], generation=g.generation,
                   seconds=time.perf_counter() - t0, within=within, same_camera=same_camera)
        return out

    @app.post("/api/crops", summary="Add an uploaded crop to the gallery (server started with --allow-add)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "image/*": {"schema": {"type": "string", "format": "binary"}}}}})
    async def add_crop(request: Request, camera: Annotated[int | None, Query(ge=0)] = None,
                       timestamp: Annotated[str | None, Query(description="number or ISO 8601")] = None,
                       identity: Annotated[int | None, Query(ge=-INT64_MAX - 1, le=INT64_MAX)] = None,
                       filename: str | None = None) -> dict[str, Any]:
        if not allow_add:
            raise HTTPException(403, "this server is read-only; start it with --allow-add to accept new crops")
        data = await read_body(request, limit)

        def work() -> dict[str, Any]:
            _, fmt = decode_upload(data)
            to_seconds(timestamp)  # a bad timestamp is refused before anything is written
            return add_upload(live, data, fmt, camera, timestamp, identity, filename)
        return await run_in_threadpool(work)

    return app


def _hit_meta(rec: CropRecord | SearchHit) -> dict[str, Any]:
    """What the API tells of a stored crop (a record or a search hit): camera, time, identity, track, base
    name and thumbnail URL."""
    return {"camid": rec.camid, "timestamp": rec.timestamp, "timestamp_raw": rec.timestamp_raw,
            "identity": rec.identity, "track": rec.track, "name": Path(rec.path).name,
            "thumbnail": f"/api/crops/{rec.id}/thumbnail"}


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); OSError (e.g. in use) is the caller's."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      proto=socket.IPPROTO_TCP)[0]
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets' connections, and without it
    # every answer waits ~40 ms for the client's delayed ACK (measured: 46 ms vs 2 ms per request).
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class BackgroundServer:
    """Serve an app with uvicorn in a daemon thread (tests, benchmarks): `with BackgroundServer(app) as s:
    requests.get(s.url + "/api/info")`. Port 0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(gallery: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *, allow_add: bool = False,
          max_upload_mb: float = 10.0, verify: bool = True, device: str | None = None,
          query_cfg: Any | None = None) -> None:
    """Serve `gallery` until Ctrl-C (blocking). The socket is bound before the model is built, so a port in
    use fails at once. `query_cfg`: the model that embeds uploaded queries (see `create_app`)."""
    import uvicorn

    sock = bind(host, port)
    try:
        app = create_app(gallery, allow_add=allow_add, max_upload_mb=max_upload_mb, verify=verify, device=device,
                         query_cfg=query_cfg)
        g = app.state.live.current()
        merged = "" if query_cfg is None else f", queries embedded with merging {str(query_cfg.MERGE.METHOD)}"
        print(f"reid-gallery serve: {gallery} (generation {g.generation}, {count(g.store.count(), 'crop')}, "
              f"{'uploads add crops' if allow_add else 'read-only'}{merged}) on "
              f"http://{host}:{sock.getsockname()[1]}/", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="off")).run(sockets=[sock])
    finally:
        sock.close()

