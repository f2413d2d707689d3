"""Hostile and malformed requests against the in-process API: every one gets a 4xx in OpenAI's error
shape (never a 5xx), nothing is allocated for a decompression bomb, and no request can make the
service read or write a file outside its storage folder."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image

from api_support import png_bytes

TINY = {"size": "64x64", "num_frames": 1, "num_steps": 1, "attention_type": "original"}
I2V = {"models": ["tiny-i2v", "tiny-t2v"]}


def assert_client_error(response, status: int | tuple[int, ...] = 422) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"], error
    return error


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (a decompression bomb's header)."""
    data = bytearray(png_bytes(1, 1))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def jpeg_bytes(width: int = 96, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 40).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def post_image(client, image: bytes, name: str = "in.png", content_type: str = "image/png"):
    return client.post("/v1/videos", data={"prompt": "go", "model": "tiny-i2v", **{k: str(v) for k, v in TINY.items()}},
                       files={"input_reference": (name, image, content_type)})  # fmt: skip


# ---- bodies and content types -------------------------------------------------------------------
def test_oversized_bodies_are_413_declared_or_streamed(make_api):
    with make_api(run_jobs=False, max_upload_bytes=1000) as (client, _):
        declared = client.post("/v1/videos", content=b"{" + b" " * 200_000 + b"}", headers={"content-type": "application/json"})
        assert_client_error(declared, 413)

        def chunks():  # no Content-Length: the limit must hold while streaming
            for _ in range(100):
                yield b" " * 4096

        streamed = client.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"})
        assert_client_error(streamed, 413)
        image = client.post("/v1/videos", data={"prompt": "go"}, files={"input_reference": ("a.png", b"\x89PNG" + b"\0" * 300_000)})
        assert_client_error(image, (413, 422))


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", b'{"prompt": "x"}'),
    ("application/xml", b"<prompt>x</prompt>"),
    ("", b'{"prompt": "x"}'),
    ("application/json; charset=utf-8", b"\xff\xfe\x00garbage"),
    ("multipart/form-data", b'{"prompt": "x"}'),
    ("multipart/form-data; boundary=zzz", b'{"prompt": "x"}'),
    ("application/x-www-form-urlencoded", b"prompt=%ZZ&size=64x64&%%%"),
    ("application/json", b'{"prompt": "x", "prompt": "y", ' + b'"size": ' * 2 + b"}"),
    ("application/json", b"[" * 100_000 + b"]" * 100_000),
])  # fmt: skip
def test_wrong_content_types_and_malformed_bodies(make_api, content_type, body):
    with make_api(run_jobs=False) as (client, _):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post("/v1/videos", content=body, headers=headers)
        assert_client_error(response, (415, 422))


# ---- images -------------------------------------------------------------------------------------
def test_decompression_bomb_is_refused_from_its_header(make_api):
    with make_api(run_jobs=False, **I2V) as (client, _):
        started = time.perf_counter()
        error = assert_client_error(post_image(client, png_with_header_size(60_000, 60_000)))
        assert error["param"] == "input_reference" and "pixels; the limit is" in error["message"], error
        assert time.perf_counter() - started < 5.0  # refused from the header, 3.6 gigapixels never decoded


@pytest.mark.parametrize("make_image, name", [
    (lambda: png_bytes(96, 64)[: len(png_bytes(96, 64)) * 2 // 3], "truncated.png"),
    (lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], "truncated.jpg"),
    (lambda: jpeg_bytes()[:200], "header-only.jpg"),
    (lambda: png_with_header_size(64, 64), "lying-header.png"),
    (lambda: b"GIF89a" + b"\0" * 64, "fake.gif"),
    (lambda: b"\x89PNG\r\n\x1a\n" + b"\xff" * 64, "garbage-after-signature.png"),
])  # fmt: skip
def test_truncated_and_corrupt_images_are_422(make_api, make_image, name):
    with make_api(run_jobs=False, **I2V) as (client, _):
        error = assert_client_error(post_image(client, make_image(), name=name))
        assert error["param"] == "input_reference", error


def test_bad_data_urls(make_api):
    with make_api(run_jobs=False, **I2V) as (client, _):
        for url in ("data:image/png;base64,@@@@", "data:image/png;base64," + "A" * 5, "file:///etc/passwd",
                    "data:text/html,<script>", {"nested": "object"}):  # fmt: skip
            body = {"prompt": "go", "model": "tiny-i2v", **TINY, "input_reference": {"image_url": url}}
            assert_client_error(client.post("/v1/videos", json=body))
        extra = {"prompt": "go", "model": "tiny-i2v", **TINY, "input_reference": {"image_url": "data:,", "detail": "x"}}
        assert_client_error(client.post("/v1/videos", json=extra))


# ---- fields -------------------------------------------------------------------------------------
BAD_VALUES = [
    {"prompt": None}, {"prompt": 42}, {"prompt": ["a", "b"]}, {"prompt": {"text": "a"}},
    {"prompt": "x" * 1_000_000}, {"prompt": "null \x00 byte"}, {"prompt": "escape \x1b[31m red"},
    {"negative_prompt": "\x7f"},
    {"size": "-16x16"}, {"size": "0x0"}, {"size": "16x99999"}, {"size": "99999x99999"}, {"size": "64X64"},
    {"size": " 64x64"}, {"size": "64x64x64"}, {"size": 6464}, {"size": "１２８x128"},
    {"num_frames": -1}, {"num_frames": 0}, {"num_frames": 10**12}, {"num_frames": 2**70}, {"num_frames": 5.5},
    {"num_frames": "many"}, {"num_steps": -1}, {"num_steps": 0}, {"num_steps": 10**9},
    {"seconds": -1}, {"seconds": 0}, {"seconds": 1e308}, {"seconds": 10**400}, {"seconds": "forever"},
    {"seed": -1}, {"seed": 2**64}, {"sla_topk": -0.5}, {"guidance_scale": 1e9}, {"shift": -1},
    {"sigma_max": 1e308}, {"boundary": 1.5},
    {"resolution": "8k"}, {"aspect_ratio": "0:0"}, {"aspect_ratio": "16:9:1"},
    {"attention_type": "../../etc/passwd"}, {"sampler": None, "num_steps": 100},
    {"image_path": "/etc/passwd"}, {"result_key": "../x.mp4"}, {"__proto__": {}}, {"unknown": 1},
]  # fmt: skip


@pytest.mark.parametrize("change", BAD_VALUES, ids=[str(sorted(c))[:40] + f"-{i}" for i, c in enumerate(BAD_VALUES)])
def test_bad_field_values_are_422(make_api, change):
    with make_api(run_jobs=False) as (client, context):
        response = client.post("/v1/videos", json={"prompt": "a cat", **TINY, **change})
        assert_client_error(response, (413, 422))
        assert context.store.counts()["queued"] == 0


def test_lone_surrogates_in_json_are_422(make_api):
    """Valid JSON escapes that are not text (no UTF-8 encoding exists for them)."""
    with make_api(run_jobs=False) as (client, context):
        for body in (b'{"prompt": "a \\ud800 cat"}', b'{"prompt": "ok", "negative_prompt": "\\udfff"}'):
            error = assert_client_error(client.post("/v1/videos", content=body, headers={"content-type": "application/json"}))
            assert "prompt" in error["param"], error
        assert context.store.counts()["queued"] == 0


@pytest.mark.parametrize("raw", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
@pytest.mark.parametrize("field", ["seconds", "sigma_max", "shift", "guidance_scale", "sla_topk", "boundary"])
def test_non_finite_numbers_are_422(make_api, field, raw):
    """Python's JSON parser accepts NaN and Infinity: they must not reach the sampler (or int())."""
    with make_api(run_jobs=False) as (client, context):
        body = b'{"prompt": "a cat", "size": "64x64", "num_frames": 1, "num_steps": 1, "%s": %s}' % (field.encode(), raw)
        error = assert_client_error(client.post("/v1/videos", content=body, headers={"content-type": "application/json"}))
        assert field in error["message"], error
        assert context.store.counts()["queued"] == 0


@pytest.mark.parametrize("key", ["", " ", "a" * 256, "new\\nline", "semi;colon", "quote\"", "ünïcode"])
def test_malformed_idempotency_keys_are_422(make_api, key):
    with make_api(run_jobs=False) as (client, context):
        response = client.post("/v1/videos", json={"prompt": "a cat", **TINY},
                               headers={"Idempotency-Key": key.encode("utf-8")})  # fmt: skip
        error = assert_client_error(response)
        assert error["param"] == "Idempotency-Key"
        assert context.store.counts()["queued"] == 0


# ---- the storage folder -------------------------------------------------------------------------
TRAVERSALS = [
    "..", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%5C..%5Cwindows",
    "%2Fetc%2Fpasswd", "video_" + "0" * 32 + "%2F..%2F..%2Fjobs.sqlite3", "video_%00", "jobs.sqlite3",
    "video_" + "0" * 32 + "%00.mp4", "~root", "%252e%252e%252f",
]  # fmt: skip


@pytest.mark.parametrize("video_id", TRAVERSALS)
def test_ids_cannot_reach_outside_the_store(make_api, video_id):
    with make_api(run_jobs=False) as (client, _):
        for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            response = client.request(method, f"/v1/videos/{video_id}{suffix}")
            assert response.status_code in (404, 405), (method, video_id, response.status_code, response.text[:200])
            assert b"root:" not in response.content and b"SQLite" not in response.content


@pytest.mark.parametrize("path", ["/static/../settings.py", "/static/%2e%2e/app.py", "/static/..%2Fapp.py",
                                  "/static/%2e%2e%2f%2e%2e%2fsettings.py", "/static//etc/passwd"])  # fmt: skip
def test_static_files_stay_in_their_folder(make_api, path):
    with make_api(run_jobs=False) as (client, _):
        response = client.get(path)
        assert response.status_code == 404 and b"import" not in response.content, (path, response.status_code)


def test_uploads_are_written_inside_the_storage_folder_only(make_api, tmp_path):
    def files_outside_storage():
        return {p for p in tmp_path.rglob("*") if p.is_file() and "storage" not in p.relative_to(tmp_path).parts}

    with make_api(run_jobs=False, **I2V) as (client, context):
        before = files_outside_storage()
        response = post_image(client, png_bytes(64, 64), name="../../../../outside.png")
        assert response.status_code == 200, response.text
        record = context.store.get(response.json()["id"])
        stored = context.storage.path(record.spec.image_path)
        assert stored.is_relative_to(context.storage.root) and stored.name == "input.png"
        assert files_outside_storage() == before


def test_a_result_key_pointing_outside_is_never_served(make_api, tmp_path):
    """A tampered or corrupt record (the store is shared infrastructure) must not become a file read."""
    from dataclasses import replace

    from turbo_serve.jobs.record import JobRecord, JobState
    from turbo_serve.pipeline.spec import GenerationSpec

    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"\0\0\0\x18ftypSECRET")
    with make_api(run_jobs=False) as (client, context):
        for key in ("../secret.mp4", str(secret), "video_x/../../secret.mp4"):
            record = JobRecord(id=f"video_{abs(hash(key)):032x}"[:38], spec=GenerationSpec(prompt="x"))
            context.store.create(record)
            context.store._update(record.id, lambda r: replace(r, state=JobState.COMPLETED, result_key=key,
                                                               entered_at={**r.entered_at, "completed": time.time()}))  # fmt: skip
            response = client.get(f"/v1/videos/{record.id}/content")
            assert response.status_code == 404 and b"SECRET" not in response.content, (key, response.status_code)


def test_deleting_a_video_removes_its_whole_folder(make_api):
    """Including a partial mp4 a VAE replica killed mid-write left next to the finished one."""
    with make_api() as (client, context):
        video_id = client.post("/v1/videos", json={"prompt": "kept briefly", **TINY}).json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/videos/{video_id}").json()["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        folder = context.storage.path(video_id)
        (folder / ".partial-4242-1-t2v_0_tiny-t2v_20260101-000000.mp4").write_bytes(b"half a video")
        assert client.delete(f"/v1/videos/{video_id}").json()["deleted"] is True
        assert not folder.exists() and context.storage.root.is_dir()
