"""The HTTP API (OpenAI Videos shape) and the web page, as a FastAPI app.

Built around an `ApiContext` (settings, job store, storage folder, job runner, cluster status),
so it runs the same inside the Ray Serve Ingress and in-process in tests. Errors follow OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, plus `details` listing every bad field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from turbo_serve.api.images import check_image, decode_image_reference
from turbo_serve.api.schemas import (
    ErrorResponse,
    FieldError,
    Video,
    VideoCreateRequest,
    VideoDeleted,
    VideoList,
    model_card,
    parse_request,
    resolve_spec,
    video_object,
)
from turbo_serve.jobs.record import IdempotencyConflict, IllegalTransition, JobRecord, JobState, QueueFull
from turbo_serve.jobs.runner import JobRunner
from turbo_serve.jobs.storage import Storage, input_key
from turbo_serve.jobs.store import JobStore
from turbo_serve.metrics import ServingMetrics
from turbo_serve.settings import Settings

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:\-]{1,255}$")
_VIDEO_ID = re.compile(r"^video_[0-9a-f]{32}$")


_ERRORS = {
    401: "Missing or wrong API key (when the server has one)",
    404: "No such video, or its file is gone",
    409: "Idempotency-Key reused for another request; the video was cancelled; or it is not completed yet",
    413: "Request body over the size limit",
    415: "Content-Type is neither JSON nor a form",
    422: "Invalid fields: `details` lists each with its rule",
    429: "The queue is full: retry after Retry-After seconds",
    503: "The job store is unreachable, or generation failed for a retryable reason",
    504: "The video was not ready within sync_timeout_s; poll it",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}


def _documented_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer (401 on every /v1 route)."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in sorted({401, *statuses}):
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _ERRORS[status]}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        documented[status] = entry
    return documented


_MP4 = {200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}, "description": "The mp4"}}


@dataclass
class ApiContext:
    settings: Settings
    store: JobStore
    storage: Storage
    runner: JobRunner
    cluster_status: Callable[[], Awaitable[dict[str, Any]]] | None = None
    """Replicas per deployment and GPU state (the serving layer provides it)."""
    shutdown_grace_s: float = 30.0
    """How long a stopping replica lets its running jobs finish before it re-queues them."""
    metrics: ServingMetrics = dataclasses.field(default_factory=ServingMetrics)
    """Counts 422s and 429s (Ray's metrics inside a replica, a local registry elsewhere)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_response(status: int, message: str, *, code: str, param: str | None = None,
                   details: list[dict] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    kind = "invalid_request_error" if status < 500 else "server_error"
    body: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


PUBLIC_PATHS = frozenset({"/healthz", "/"})
PUBLIC_PREFIXES = ("/static/",)
"""What answers without the API key: liveness and the web page (which then sends the key itself)."""


class ApiKeyMiddleware:
    """Every path but PUBLIC_PATHS needs `Authorization: Bearer <key>`. A middleware rather than a
    route dependency, so a route added later (or FastAPI's own /docs and /openapi.json) is guarded
    without anyone remembering to; pure ASGI so client disconnects still cancel the handler."""

    def __init__(self, app, key: str):
        self.app, self._key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._public(scope) and not self._authorized(scope):
            response = error_response(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def _public(scope) -> bool:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    def _authorized(self, scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token, self._key)


def create_app(ctx: ApiContext) -> FastAPI:
    settings = ctx.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await ctx.runner.start()
        yield
        await ctx.runner.stop(grace_s=ctx.shutdown_grace_s)

    app = FastAPI(title="turbo-serve", version="0.1.0", lifespan=lifespan,
                  description="TurboDiffusion video generation; OpenAI Videos API shape.")  # fmt: skip
    _install_error_handlers(app, ctx.metrics)

    async def store_unavailable(_: Request, error: Exception) -> JSONResponse:
        logger.warning("job store unavailable: %s: %s", type(error).__name__, error)
        return error_response(503, f"the job store is unavailable ({type(error).__name__}); retry later",
                              code="store_unavailable", headers={"Retry-After": "2"})  # fmt: skip

    for error_type in ctx.store.unavailable:
        app.add_exception_handler(error_type, store_unavailable)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value())

    api = APIRouter(prefix="/v1")
    body_doc = {"requestBody": {"content": {
        "application/json": {"schema": VideoCreateRequest.model_json_schema()},
        "multipart/form-data": {"schema": VideoCreateRequest.model_json_schema()},
    }, "required": True}}  # fmt: skip

    async def store_call(method, *args, **kwargs):
        return await asyncio.to_thread(method, *args, **kwargs)

    async def find(video_id: str) -> JobRecord:
        record = await store_call(ctx.store.get, video_id) if _VIDEO_ID.match(video_id) else None
        if record is None:
            raise ApiError(404, f"no video with id {video_id!r}", code="not_found", param="video_id")
        return record

    async def create(request: Request) -> JobRecord:
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise FieldError([("Idempotency-Key", "must be 1-255 characters of letters, digits and . _ : -")])
        data, image_data = await _read_create_body(request, settings)
        parsed = parse_request(data)
        image = None
        if image_data is None and parsed.input_reference is not None:
            image_data = decode_image_reference(parsed.input_reference)
        if image_data is not None:
            image = check_image(image_data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_upload_pixels)
        spec = resolve_spec(parsed, settings, image_size=(image.width, image.height) if image else None)

        job_id = f"video_{uuid.uuid4().hex}"
        fingerprint = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
        if image is not None:
            fingerprint.update(hashlib.sha256(image.data).digest())
            key = input_key(job_id, image.extension)
            await asyncio.to_thread(ctx.storage.write_bytes, key, image.data)
            spec = dataclasses.replace(spec, image_path=key)
        record = JobRecord(id=job_id, spec=spec, idempotency_key=idempotency_key, fingerprint=fingerprint.hexdigest())
        created = False
        try:
            stored, created = await store_call(ctx.store.create, record, max_active=settings.max_queued_jobs)
        except QueueFull as error:
            ctx.metrics.count_rejected(spec.model)
            raise ApiError(429, f"the queue is full ({error}); retry later", code="queue_full",
                           headers={"Retry-After": str(ctx.runner.retry_after_s())}) from None  # fmt: skip
        except IdempotencyConflict as error:
            raise ApiError(409, str(error), code="idempotency_conflict", param="Idempotency-Key") from None
        else:
            ctx.runner.wake()
        finally:
            if image is not None and not created:  # rejected, or an earlier job with the same key
                await asyncio.to_thread(ctx.storage.delete, spec.image_path)
        return stored

    @api.post("/videos", openapi_extra=body_doc, summary="Create a video job", response_model=Video,
              responses=_documented_errors(409, 413, 415, 422, 429, 503))  # fmt: skip
    async def create_video(request: Request) -> JSONResponse:
        record = await create(request)
        return JSONResponse(video_object(record, settings).model_dump(mode="json"))

    @api.post("/videos/sync", openapi_extra=body_doc, summary="Create a video and wait for the mp4",
              response_class=FileResponse, responses={**_MP4, **_documented_errors(404, 409, 413, 415, 422, 429, 503, 504)})  # fmt: skip
    async def create_video_sync(request: Request):
        record = await create(request)
        try:
            done = await ctx.runner.wait_finished(record.id, timeout_s=settings.sync_timeout_s)
        except asyncio.CancelledError:  # the client went away: nobody will collect the video
            await store_call(ctx.store.request_cancel, record.id)
            ctx.runner.cancel_local(record.id)
            raise
        if done is None:
            raise ApiError(404, f"video {record.id} was deleted while it ran", code="not_found")
        headers = {"X-Video-Id": done.id}
        if done.state is JobState.COMPLETED:
            return _content_response(ctx.storage, done, headers)
        if done.state is JobState.CANCELLED:
            raise ApiError(409, f"video {done.id} was cancelled", code="cancelled", headers=headers)
        if done.state is JobState.FAILED:
            # Retrying the same request cannot help an invalid or too-large one; anything else may pass later.
            status = 422 if done.error and done.error.code in ("invalid_request", "out_of_memory") else 503
            message = done.error.message if done.error else "generation failed"
            raise ApiError(status, f"video {done.id} failed: {message}", code=done.error.code if done.error else "failed",
                           headers={**headers, **({"Retry-After": str(ctx.runner.retry_after_s())} if status == 503 else {})})  # fmt: skip
        raise ApiError(504, f"video {done.id} is still {done.state.api_status} after {settings.sync_timeout_s:g} s; "
                       f"poll GET /v1/videos/{done.id}", code="timeout", headers=headers)  # fmt: skip

    @api.get("/videos", response_model=VideoList, summary="List videos, newest first", responses=_documented_errors(422, 503))
    async def list_videos(
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
    ) -> VideoList:
        try:
            records, has_more = await store_call(ctx.store.list, after=after, limit=limit, order=order)
        except KeyError:
            raise FieldError([("after", f"no video with id {after!r}")]) from None
        data = [video_object(r, settings) for r in records]
        return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=has_more)  # fmt: skip

    @api.get("/videos/{video_id}", summary="Retrieve a video job", response_model=Video,
             responses=_documented_errors(404, 503))  # fmt: skip
    async def retrieve_video(video_id: str) -> JSONResponse:
        return JSONResponse(video_object(await find(video_id), settings).model_dump(mode="json"))

    @api.delete("/videos/{video_id}", response_model=VideoDeleted, summary="Delete a video (cancels it if running)",
                responses=_documented_errors(404, 503))  # fmt: skip
    async def delete_video(video_id: str) -> VideoDeleted:
        record = await find(video_id)
        if not record.state.terminal:
            record = await store_call(ctx.store.request_cancel, video_id) or record
            ctx.runner.cancel_local(video_id)
            if not record.state.terminal:
                return VideoDeleted(id=video_id, deleted=False, status=record.state.api_status)
        try:
            deleted = await store_call(ctx.store.delete, video_id)
        except IllegalTransition:  # it was re-queued meanwhile: cancelling is all we can do now
            return VideoDeleted(id=video_id, deleted=False, status=record.state.api_status)
        await asyncio.to_thread(ctx.storage.delete_job, video_id)
        return VideoDeleted(id=video_id, deleted=deleted is not None, status=record.state.api_status)

    @api.get("/videos/{video_id}/content", response_class=FileResponse, summary="Download the mp4",
             responses={**_MP4, **_documented_errors(404, 409, 422, 503)})  # fmt: skip
    async def download_video(video_id: str, variant: Literal["video"] = "video"):
        record = await find(video_id)
        if record.state is not JobState.COMPLETED:
            raise ApiError(409, f"video {video_id} is {record.state.api_status}; content exists once it is completed",
                           code="not_ready")  # fmt: skip
        return _content_response(ctx.storage, record, {})

    @api.get("/models", summary="Served models with their defaults, choices and limits", responses=_documented_errors())
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(settings, m) for m in settings.models]}

    @api.get("/status", summary="Queue, jobs by state, replicas per deployment, GPUs", responses=_documented_errors(503))
    async def status() -> dict[str, Any]:
        counts = await store_call(ctx.store.counts)
        running = sum(counts[s.value] for s in JobState if s.running)
        cluster = await ctx.cluster_status() if ctx.cluster_status else {"deployments": {}, "gpus": {"available": False, "reason": "no cluster status in this process"}}
        return {
            "queue_depth": counts[JobState.QUEUED.value],
            "running": running,
            "jobs": counts,
            "max_queued_jobs": settings.max_queued_jobs,
            "retry_after_s": ctx.runner.retry_after_s(),
            "runner": {"owner": ctx.runner.owner, "running_here": ctx.runner.running_jobs},
            **cluster,
        }

    app.include_router(api)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        await store_call(ctx.store.counts)  # the store must answer for the app to be healthy
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _content_response(storage: Storage, record: JobRecord, headers: dict[str, str]) -> FileResponse:
    try:
        path = storage.path(record.result_key) if record.result_key else None
    except ValueError:  # a corrupt or tampered record: never read outside the storage folder
        logger.error("video %s has a result key outside the storage folder: %r", record.id, record.result_key)
        path = None
    if path is None or not path.is_file():
        raise ApiError(404, f"the video file of {record.id} is gone (expired or deleted)", code="not_found")
    return _Mp4Response(path, media_type="video/mp4", filename=path.name, headers=headers)


class _Mp4Response(FileResponse):
    """Sent in 4 MiB pieces rather than Starlette's 64 KiB: behind Ray Serve each piece is one
    message from the replica to the proxy, and an 81-frame mp4 runs to megabytes (a 12.9 MB file
    through a local Serve proxy: 64 KiB 115-140 ms, 1 MiB 45-52 ms, 4 MiB 36 ms, 16 MiB 46-52 ms)."""

    chunk_size = 4 << 20


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_create_body(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes | None]:
    """The create request's fields and the uploaded image's bytes (multipart file part), if any."""
    # Room for the image (base64 in JSON costs 4/3) plus the text fields.
    body = await _read_body(request, settings.max_upload_bytes * 4 // 3 + 4 * settings.max_prompt_chars + 65536)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FieldError([("body", f"is not valid JSON: {error}")]) from None
        except RecursionError:  # the parser recurses per nesting level
            raise FieldError([("body", "is nested too deeply to be a create request")]) from None
        if not isinstance(data, dict):
            raise FieldError([("body", "must be a JSON object")])
        return data, None
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _parse_form(request, body, settings)
    raise ApiError(415, f"Content-Type must be application/json or multipart/form-data, got {content_type or 'none'!r}",
                   code="unsupported_media_type")  # fmt: skip


async def _parse_form(request: Request, body: bytes, settings: Settings) -> tuple[dict[str, Any], bytes | None]:
    async def stream():
        yield body

    limits = {"max_fields": 64, "max_part_size": settings.max_upload_bytes * 4 // 3 + 65536}
    try:
        if request.headers.get("content-type", "").lower().startswith("multipart/"):
            form = await MultiPartParser(request.headers, stream(), max_files=1, **limits).parse()
        else:
            form = await FormParser(request.headers, stream(), **limits).parse()
    except MultiPartException as error:
        raise FieldError([("body", f"malformed form data: {error.message}")]) from None
    data: dict[str, Any] = {}
    image: bytes | None = None
    for key in form.keys():
        values = form.getlist(key)
        if len(values) > 1:
            raise FieldError([(key, "given more than once")])
        value = values[0]
        if isinstance(value, UploadFile):
            if key != "input_reference":
                raise FieldError([(key, "only input_reference may be a file")])
            image = await value.read()
            await value.close()
        elif key.startswith("input_reference[") and key.endswith("]"):  # OpenAI's object form
            data.setdefault("input_reference", {})[key[len("input_reference["):-1]] = value
        else:
            data[key] = value
    return data, image


def _install_error_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    @app.exception_handler(FieldError)
    async def field_error(_: Request, error: FieldError) -> JSONResponse:
        metrics.count_validation_error(error.errors[0][0])
        details = [{"param": p, "message": m} for p, m in error.errors]
        return error_response(422, str(error), code="invalid_value", param=error.errors[0][0], details=details)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = [(".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), e["msg"]) for e in error.errors()]
        return await field_error(_, FieldError(errors))

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, code=error.code, param=error.param, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(error.status_code, str(error.detail), code=code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        logger.exception("unhandled error %s on %s %s", incident, request.method, request.url.path)
        return error_response(500, f"internal error {incident}: {type(error).__name__}; the service logged it",
                              code="internal_error")  # fmt: skip
