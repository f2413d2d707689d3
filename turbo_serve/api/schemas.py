"""Request and response schemas of the HTTP API: the one source of truth for what a request may say.

The create request follows OpenAI's Videos API (`model`, `prompt`, `size` "WxH", `seconds`,
`input_reference`) and adds TurboDiffusion's parameters as extra fields. Geometry rules:

- `size` "WxH" gives width and height directly; otherwise `resolution` (480p | 720p, default the
  model's) and `aspect_ratio` (W:H, default 16:9) pick an entry of TurboDiffusion's table. For I2V
  with `adaptive_resolution` (default on) and no `size`, the table entry's area is kept and the
  input image's aspect followed. Width and height are multiples of 16.
- Video runs at 16 fps and Wan needs 4n+1 frames: `seconds` s maps to num_frames = 4*round(16*s/4)+1
  (4 s -> 65 frames, 5 s -> 81) and a video reports seconds = (num_frames - 1) / 16. `num_frames`
  may be given instead; giving both requires them to agree.

Validation defers to the rules' owners (turbo_serve.pipeline.resolution, the model presets, the
attention registry), and every failure names the field and the rule.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from turbo_kernels.registry import AttentionMetadata, attention_types
from turbo_serve.jobs.record import JobRecord
from turbo_serve.jobs.runner import needs_negative_prompt
from turbo_serve.models.configs import ModelPreset, get_preset
from turbo_serve.pipeline.memory import GIB, estimate_denoise_memory, lowering_advice
from turbo_serve.pipeline.resolution import (
    ASPECT_RATIOS,
    FPS,
    RESOLUTIONS,
    SIZE_MULTIPLE,
    adaptive_size,
    check_num_frames,
    check_size,
    resolve_size,
)
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.sampling import rcm
from turbo_serve.settings import Settings

SAMPLERS = ("rcm", "unipc", "euler")
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationSpec)}


class FieldError(Exception):
    """One or more invalid request fields, each (param, message); answered with 422."""

    def __init__(self, errors: list[tuple[str, str]]):
        super().__init__("; ".join(f"{p}: {m}" for p, m in errors))
        self.errors = errors


class VideoCreateRequest(BaseModel):
    """Body of POST /v1/videos (JSON, or multipart form fields with an `input_reference` file)."""

    # NaN and Infinity parse as JSON numbers in Python; no field has a use for them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(description="What the video shows.")
    model: str | None = Field(None, description="A served model (GET /v1/models); default the first.")
    size: str | None = Field(None, description="WxH in pixels, multiples of 16, e.g. 832x480.")
    seconds: float | None = Field(None, gt=0, le=3600, description="Duration at 16 fps; 4n+1 frames (see num_frames).")
    input_reference: Any = Field(
        None, description="I2V image: a PNG/JPEG file part (multipart), or {'image_url': 'data:image/png;base64,...'}."
    )
    resolution: Literal["480p", "720p"] | None = None
    aspect_ratio: str | None = Field(None, description=f"One of {', '.join(ASPECT_RATIOS)}.")
    adaptive_resolution: bool | None = Field(None, description="I2V: follow the image's aspect (default true).")
    num_frames: int | None = Field(None, ge=1, description="4n+1 frames (1, 5, ..., 81).")
    num_steps: int | None = Field(None, ge=1, le=100)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    sigma_max: float | None = Field(None, gt=0, le=1000, description="rCM starting sigma (defaults 80 T2V, 200 I2V).")
    attention_type: str | None = None
    sla_topk: float | None = Field(None, gt=0, le=1, description="Fraction of key blocks attended exactly, (0, 1].")
    quant_linear: bool | None = None
    boundary: float | None = Field(None, gt=0, lt=1, description="I2V expert switch in RF time.")
    ode: bool | None = None
    sampler: Literal["rcm", "unipc", "euler"] | None = None
    guidance_scale: float | None = Field(None, ge=1, le=50, description="CFG scale (unipc/euler only).")
    negative_prompt: str | None = None
    shift: float | None = Field(None, gt=0, le=100, description="Flow-matching shift (unipc/euler only).")


def parse_request(data: dict[str, Any]) -> VideoCreateRequest:
    """Pydantic validation with errors turned into FieldError (param = the field's dotted path)."""
    try:
        return VideoCreateRequest.model_validate(data)
    except ValidationError as error:
        raise FieldError([(_loc(e["loc"]), _pydantic_message(e)) for e in error.errors()]) from None


def _loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "body"


def _pydantic_message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown field; valid fields: {', '.join(VideoCreateRequest.model_fields)}"
    if error["type"] == "missing":
        return "field required"
    return error["msg"]


def seconds_to_frames(seconds: float, fps: int = FPS) -> int:
    return 4 * round(seconds * fps / 4) + 1


def frames_to_seconds(num_frames: int, fps: int = FPS) -> str:
    return f"{(num_frames - 1) / fps:g}"


def model_defaults(settings: Settings, model: str) -> dict[str, Any]:
    """Defaults a request of `model` gets for every field it leaves out (also shown by the page)."""
    preset = get_preset(model)
    width, height = resolve_size(preset.default_resolution, "16:9")
    return {
        "resolution": preset.default_resolution,
        "aspect_ratio": "16:9",
        "size": f"{width}x{height}",
        "adaptive_resolution": preset.task == "i2v",
        "num_frames": _SPEC_DEFAULTS["num_frames"],
        "seconds": frames_to_seconds(_SPEC_DEFAULTS["num_frames"]),
        "num_steps": _SPEC_DEFAULTS["num_steps"],
        "seed": _SPEC_DEFAULTS["seed"],
        "sigma_max": preset.default_sigma_max,
        "attention_type": settings.attention_type,
        "sla_topk": settings.sla_topk,
        "quant_linear": settings.quant_linear,
        "boundary": preset.default_boundary,
        "ode": _SPEC_DEFAULTS["ode"],
        "sampler": _SPEC_DEFAULTS["sampler"],
        "guidance_scale": _SPEC_DEFAULTS["guidance_scale"],
        "negative_prompt": _SPEC_DEFAULTS["negative_prompt"],
        "shift": _SPEC_DEFAULTS["shift"],
    }


def model_limits(settings: Settings, preset: ModelPreset) -> dict[str, Any]:
    # The DiT's RoPE tables bound the latent grid: H/16 and W/16 patches per axis.
    rope_side = (preset.dit.rope_max_positions - 1) * preset.vae.spatial_stride * preset.dit.patch_size[1]
    return {
        "max_num_frames": preset.max_num_frames,
        "max_num_steps": {"rcm": rcm.MAX_STEPS, "unipc": 100, "euler": 100},
        "max_frame_pixels": settings.max_frame_pixels,
        "max_side": rope_side,
        "size_multiple": SIZE_MULTIPLE,
        "fps": FPS,
        "max_prompt_chars": settings.max_prompt_chars,
        "max_upload_bytes": settings.max_upload_bytes,
        "max_upload_pixels": settings.max_upload_pixels,
        "denoiser_memory_gib": settings.denoiser_memory_gib,
    }


def model_card(settings: Settings, model: str) -> dict[str, Any]:
    """An entry of GET /v1/models: OpenAI's model object plus task, defaults, choices and limits."""
    preset = get_preset(model)
    return {
        "id": model,
        "object": "model",
        "created": 0,
        "owned_by": "turbo-serve",
        "task": preset.task,
        "defaults": model_defaults(settings, model),
        "choices": {
            "resolution": list(RESOLUTIONS),
            "aspect_ratio": list(ASPECT_RATIOS),
            "attention_type": attention_types(),
            "sampler": list(SAMPLERS),
        },
        "limits": model_limits(settings, preset),
    }


def _check_prompt(name: str, text: str, settings: Settings, errors: list, *, required: bool) -> str:
    text = text.strip()
    if required and not text:
        errors.append((name, "must not be empty"))
    if len(text) > settings.max_prompt_chars:
        errors.append((name, f"is {len(text)} characters; the limit is {settings.max_prompt_chars}"))
    if any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in text):
        errors.append((name, "must not contain control characters"))
    surrogate = next((c for c in text if unicodedata.category(c) == "Cs"), None)
    if surrogate is not None:  # JSON can escape one (\ud800), but no UTF-8 text holds it
        errors.append((name, f"must be valid Unicode text: lone surrogate U+{ord(surrogate):04X}"))
    return text


def resolve_spec(
    request: VideoCreateRequest,
    settings: Settings,
    *,
    image_size: tuple[int, int] | None = None,
) -> GenerationSpec:
    """The GenerationSpec a valid request asks for; FieldError listing every invalid field."""
    errors: list[tuple[str, str]] = []
    model = request.model or settings.default_model
    if model not in settings.models:
        raise FieldError([("model", f"unknown model {model!r}; served models: {', '.join(settings.models)}")])
    preset = get_preset(model)
    defaults = model_defaults(settings, model)
    limits = model_limits(settings, preset)

    prompt = _check_prompt("prompt", request.prompt, settings, errors, required=True)
    negative_prompt = _check_prompt("negative_prompt", request.negative_prompt or "", settings, errors, required=False)

    if preset.task == "i2v" and image_size is None:
        errors.append(("input_reference", f"model {model} is image-to-video: send a PNG or JPEG image"))
    if preset.task == "t2v" and image_size is not None:
        i2v = [m for m in settings.models if get_preset(m).task == "i2v"]
        errors.append(("input_reference", f"model {model} is text-to-video; image-to-video models served: {i2v or 'none'}"))

    width, height = _resolve_geometry(request, preset, defaults, image_size, errors)
    if width is not None and height is not None:
        try:
            check_size(width, height)
        except ValueError as error:
            errors.append(("size", str(error)))
        if width * height > limits["max_frame_pixels"]:
            errors.append(("size", f"{width}x{height} is {width * height} pixels; the limit is {limits['max_frame_pixels']}"))
        if max(width, height) > limits["max_side"]:
            errors.append(("size", f"{width}x{height}: a side may be at most {limits['max_side']} for model {model}"))

    num_frames = _resolve_frames(request, defaults, errors)
    if num_frames is not None and num_frames > limits["max_num_frames"]:
        errors.append(("num_frames", f"{num_frames} frames exceeds model {model}'s limit of {limits['max_num_frames']}"))

    attention_type = request.attention_type or settings.attention_type
    valid_attention = attention_types()
    if attention_type not in valid_attention:
        errors.append(("attention_type", f"unknown attention type {attention_type!r}; valid: {', '.join(valid_attention)}"))
    sla_topk = request.sla_topk if request.sla_topk is not None else settings.sla_topk
    try:
        AttentionMetadata(attention_type=attention_type, sla_topk=sla_topk)
    except ValueError as error:
        errors.append(("sla_topk", str(error)))
    if request.quant_linear is not None and request.quant_linear != settings.quant_linear:
        state = "on" if settings.quant_linear else "off"
        errors.append(("quant_linear", f"this server runs with quant_linear {state} (TURBO_SERVE_QUANT_LINEAR); a request cannot switch it"))
    sampler = request.sampler or defaults["sampler"]
    num_steps = request.num_steps or defaults["num_steps"]
    if sampler == "rcm" and num_steps > rcm.MAX_STEPS:
        errors.append(("num_steps", f"the rcm sampler takes 1..{rcm.MAX_STEPS} steps, got {num_steps}; unipc and euler take more"))
    if request.boundary is not None and preset.task != "i2v":
        errors.append(("boundary", f"only image-to-video models switch experts; {model} is text-to-video"))

    if errors:
        raise FieldError(errors)
    pick = lambda name: getattr(request, name) if getattr(request, name) is not None else defaults[name]  # noqa: E731
    spec = GenerationSpec(
        prompt=prompt,
        model=model,
        width=width,
        height=height,
        num_frames=num_frames,
        num_steps=pick("num_steps"),
        seed=pick("seed"),
        sigma_max=pick("sigma_max"),
        attention_type=attention_type,
        sla_topk=sla_topk,
        quant_linear=settings.quant_linear,
        boundary=pick("boundary") if preset.task == "i2v" else None,
        ode=pick("ode"),
        sampler=pick("sampler"),
        guidance_scale=pick("guidance_scale"),
        negative_prompt=negative_prompt,
        shift=pick("shift"),
        fps=FPS,
    )
    _check_memory(settings, spec)
    return spec


def _check_memory(settings: Settings, spec: GenerationSpec) -> None:
    """Refuse up front what the Denoiser could not hold, rather than fail it after its queue wait."""
    budget = settings.denoiser_memory_gib
    if budget is None:
        return
    guided = needs_negative_prompt(spec)
    parallel = settings.parallel_config(spec.model)
    estimate = estimate_denoise_memory(spec.model, spec.width, spec.height, spec.num_frames, dtype=settings.dtype,
                                       quant_linear=settings.quant_linear, guided=guided,
                                       sequence_parallel=parallel.sequence_parallel, cfg_parallel=parallel.cfg_parallel)  # fmt: skip
    if estimate.total_bytes > budget * GIB:
        advice = lowering_advice(quant_linear=settings.quant_linear, guided=guided)
        raise FieldError([("size", f"{spec.width}x{spec.height} with {spec.num_frames} frames needs {estimate.describe()} "
                                   f"on the Denoiser, which has {budget:.1f} GiB on this server: {advice}")])  # fmt: skip


def _resolve_geometry(request, preset, defaults, image_size, errors) -> tuple[int | None, int | None]:
    table = None
    if request.resolution is not None or request.aspect_ratio is not None:
        try:
            table = resolve_size(request.resolution or defaults["resolution"], request.aspect_ratio or defaults["aspect_ratio"])
        except ValueError as error:
            errors.append(("aspect_ratio" if "aspect_ratio" in str(error) else "resolution", str(error)))
            return None, None
    if request.size is not None:
        match = _SIZE.match(request.size)
        if not match:
            errors.append(("size", f"must be WIDTHxHEIGHT in pixels, e.g. 832x480, got {request.size!r}"))
            return None, None
        size = int(match[1]), int(match[2])
        if table is not None and table != size:
            errors.append(("size", f"{request.size} disagrees with resolution/aspect_ratio ({table[0]}x{table[1]}); give one"))
        return size
    adaptive = request.adaptive_resolution if request.adaptive_resolution is not None else defaults["adaptive_resolution"]
    resolution = request.resolution or defaults["resolution"]
    aspect = request.aspect_ratio or defaults["aspect_ratio"]
    if image_size is not None and adaptive:
        return adaptive_size(resolution, aspect, *image_size)
    return table or resolve_size(resolution, aspect)


def _resolve_frames(request, defaults, errors) -> int | None:
    from_seconds = seconds_to_frames(request.seconds) if request.seconds is not None else None
    if request.num_frames is not None:
        try:
            check_num_frames(request.num_frames)
        except ValueError as error:
            errors.append(("num_frames", str(error)))
            return None
        if from_seconds is not None and from_seconds != request.num_frames:
            errors.append((
                "seconds",
                f"{request.seconds:g} s is {from_seconds} frames at {FPS} fps but num_frames is {request.num_frames}; give one",
            ))  # fmt: skip
        return request.num_frames
    return from_seconds if from_seconds is not None else defaults["num_frames"]


class ErrorDetail(BaseModel):
    param: str
    message: str


class ErrorObject(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str
    details: list[ErrorDetail] | None = None
    """Every bad field of a 422, not only the first."""


class ErrorResponse(BaseModel):
    """OpenAI's error shape, the body of every 4xx and 5xx."""

    error: ErrorObject


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """OpenAI's video object (id, status, progress, ...) plus the resolved TurboDiffusion parameters."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None
    size: str
    seconds: str
    prompt: str
    error: VideoError | None
    stage: str
    """Our finer state: queued, encoding, denoising, decoding, completed, failed, cancelled."""
    attempts: int
    parameters: dict[str, Any]
    timings: dict[str, float]


def video_object(record: JobRecord, settings: Settings) -> Video:
    spec = record.spec
    finished = record.finished_at
    parameters = {k: v for k, v in spec.to_dict().items() if k not in ("prompt", "image_path")}
    return Video(
        id=record.id,
        model=spec.model,
        status=record.state.api_status,
        progress=record.progress,
        created_at=int(record.created_at),
        completed_at=int(finished) if finished is not None else None,
        expires_at=int(finished + settings.retention_s) if finished is not None else None,
        size=f"{spec.width}x{spec.height}",
        seconds=frames_to_seconds(spec.num_frames, spec.fps),
        prompt=spec.prompt,
        error=VideoError(code=record.error.code, message=record.error.message) if record.error else None,
        stage=record.state.value,
        attempts=record.attempts,
        parameters=parameters,
        timings=record.timings,
    )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    """OpenAI's delete response. `deleted` is false when the job was still running: it is then
    cancelled (status `cancelled` once the worker stops) and can be deleted afterwards."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool
    status: str

