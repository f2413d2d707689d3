"""Every bad field gets a 422 naming the field and the rule; other bad requests get their 4xx."""

import base64

import pytest

from api_support import SMALL, png_bytes


def post(client, body=None, **kw):
    return client.post("/v1/videos", json=body, **kw)


def only_error(response):
    assert response.status_code == 422, response.text
    return response.json()["error"]


BAD_FIELDS = [
    ({"size": "250x256"}, "size", "multiple of 16"),
    ({"size": "1280x1280"}, "size", "limit is 921600"),
    ({"size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"num_frames": 6}, "num_frames", "4n+1"),
    ({"num_frames": 165}, "num_frames", "limit of 161"),
    ({"num_frames": 0}, "num_frames", "greater than or equal to 1"),
    ({"model": "sora-2"}, "model", "served models: tiny-t2v"),
    ({"attention_type": "flash9"}, "attention_type", "valid: original"),
    ({"sla_topk": 0}, "sla_topk", "greater than 0"),
    ({"sla_topk": 1.5}, "sla_topk", "less than or equal to 1"),
    ({"prompt": "   "}, "prompt", "must not be empty"),
    ({"prompt": "x" * 2001}, "prompt", "limit is 2000"),
    ({"prompt": "bell\x07"}, "prompt", "control characters"),
    ({"negative_prompt": "y" * 3000}, "negative_prompt", "limit is 2000"),
    ({"colour": "red"}, "colour", "unknown field"),
    ({"seconds": 4, "num_frames": 5}, "seconds", "65 frames"),
    ({"size": "832x480", "resolution": "480p", "aspect_ratio": "1:1"}, "size", "disagrees"),
    ({"size": None, "aspect_ratio": "2:1"}, "aspect_ratio", "must be one of"),
    ({"resolution": "4k"}, "resolution", "480p"),
    ({"quant_linear": True}, "quant_linear", "cannot switch"),
    ({"boundary": 0.5}, "boundary", "text-to-video"),
    ({"num_steps": 1000}, "num_steps", "less than or equal to 100"),
    ({"num_steps": 8}, "num_steps", "rcm sampler takes 1..4 steps"),
    ({"sampler": "ddim"}, "sampler", "rcm"),
    ({"input_reference": {"image_url": "https://example.com/a.png"}}, "input_reference.image_url", "data URLs"),
]


@pytest.mark.parametrize("change, param, rule", BAD_FIELDS, ids=[f"{p}-{r}" for _, p, r in BAD_FIELDS])
def test_bad_field_is_422_with_field_and_rule(make_api, change, param, rule):
    with make_api(run_jobs=False) as (client, _):
        body = {"prompt": "a cat", **SMALL, **change}
        body = {k: v for k, v in body.items() if v is not None}
        error = only_error(post(client, body))
        assert error["param"] == param or param in [d["param"] for d in error["details"]], error
        assert rule in error["message"], error
        assert error["type"] == "invalid_request_error"


def test_every_bad_field_is_reported_at_once(make_api):
    with make_api(run_jobs=False) as (client, _):
        error = only_error(post(client, {"prompt": "", "size": "100x100", "num_frames": 6, "attention_type": "x"}))
        assert {d["param"] for d in error["details"]} == {"prompt", "size", "num_frames", "attention_type"}


def test_missing_prompt_and_non_object_bodies(make_api):
    with make_api(run_jobs=False) as (client, _):
        assert only_error(post(client, {"size": "256x256"}))["param"] == "prompt"
        assert only_error(post(client, [1, 2]))["message"].startswith("body: must be a JSON object")
        bad_json = client.post("/v1/videos", content=b"{nope", headers={"content-type": "application/json"})
        assert "not valid JSON" in only_error(bad_json)["message"]


def test_wrong_content_type_is_415_and_huge_body_413(make_api):
    with make_api(run_jobs=False, max_upload_bytes=1000) as (client, _):
        response = client.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"})
        assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]["message"]
        huge = client.post("/v1/videos", content=b"x" * 100_000, headers={"content-type": "application/json"})
        assert huge.status_code == 413


I2V = {"models": ["tiny-i2v", "tiny-t2v"]}


@pytest.mark.parametrize(
    "image, rule",
    [
        (png_bytes(fmt="GIF"), "PNG or JPEG image, got GIF"),
        (png_bytes()[:60], "truncated or corrupt"),
        (b"definitely not an image", "not a readable image"),
        (png_bytes(200, 200), "limit is 10000"),
        (b"", "empty"),
    ],
    ids=["gif", "truncated", "garbage", "too-many-pixels", "empty"],
)
def test_bad_images_are_422_on_input_reference(make_api, image, rule):
    with make_api(run_jobs=False, max_upload_pixels=100 * 100, **I2V) as (client, _):
        response = client.post("/v1/videos", data={"prompt": "go", "model": "tiny-i2v"},
                               files={"input_reference": ("in.png", image, "image/png")})  # fmt: skip
        error = only_error(response)
        assert error["param"] == "input_reference" and rule in error["message"], error


def test_image_over_byte_limit(make_api):
    with make_api(run_jobs=False, max_upload_bytes=500, **I2V) as (client, _):
        response = client.post("/v1/videos", data={"prompt": "go", "model": "tiny-i2v"},
                               files={"input_reference": ("in.png", png_bytes(64, 64) + b"\0" * 600, "image/png")})  # fmt: skip
        assert response.status_code in (413, 422)
        if response.status_code == 422:
            assert "limit is 500" in response.json()["error"]["message"]


def test_image_rules_for_task(make_api):
    with make_api(run_jobs=False, **I2V) as (client, _):
        missing = only_error(post(client, {"prompt": "go", "model": "tiny-i2v", **SMALL}))
        assert missing["param"] == "input_reference" and "image-to-video" in missing["message"]
        data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
        for_t2v = only_error(post(client, {"prompt": "go", "model": "tiny-t2v", **SMALL,
                                           "input_reference": {"image_url": data_url}}))  # fmt: skip
        assert for_t2v["param"] == "input_reference" and "text-to-video" in for_t2v["message"]


def test_i2v_adaptive_size_follows_the_image(make_api):
    with make_api(run_jobs=False, **I2V) as (client, _):
        response = client.post("/v1/videos", data={"prompt": "go", "model": "tiny-i2v", "resolution": "480p",
                                                   "num_frames": "5"},
                               files={"input_reference": ("in.png", png_bytes(300, 200), "image/png")})  # fmt: skip
        assert response.status_code == 200, response.text
        video = response.json()
        width, height = map(int, video["size"].split("x"))
        assert width % 16 == 0 and height % 16 == 0 and width > height  # the image is landscape 3:2
        assert abs(width / height - 1.5) < 0.1


def test_idempotency_key_rules(make_api):
    with make_api(run_jobs=False) as (client, _):
        body = {"prompt": "a cat", **SMALL}
        first = post(client, body, headers={"Idempotency-Key": "order-1"}).json()
        again = post(client, body, headers={"Idempotency-Key": "order-1"}).json()
        assert again["id"] == first["id"]
        conflict = post(client, {**body, "seed": 7}, headers={"Idempotency-Key": "order-1"})
        assert conflict.status_code == 409 and "different request" in conflict.json()["error"]["message"]
        malformed = only_error(post(client, body, headers={"Idempotency-Key": "bad key with spaces"}))
        assert malformed["param"] == "Idempotency-Key"
        assert client.get("/v1/videos").json()["data"][0]["id"] == first["id"]
        assert len(client.get("/v1/videos").json()["data"]) == 1


def test_full_queue_is_429_with_retry_after(make_api):
    with make_api(run_jobs=False, max_queued_jobs=2, retry_after_s=7) as (client, _):
        for _ in range(2):
            assert post(client, {"prompt": "a cat", **SMALL}).status_code == 200
        full = post(client, {"prompt": "a cat", **SMALL})
        assert full.status_code == 429 and full.headers["Retry-After"] == "7"
        assert full.json()["error"]["code"] == "queue_full"


def test_list_query_validation_and_unknown_ids(make_api):
    with make_api(run_jobs=False) as (client, _):
        assert only_error(client.get("/v1/videos?limit=0"))["param"] == "limit"
        assert only_error(client.get("/v1/videos?order=sideways"))["param"] == "order"
        assert only_error(client.get("/v1/videos?after=video_nope"))["param"] == "after"
        for path in ("/v1/videos/video_nope", "/v1/videos/..%2F..%2Fetc%2Fpasswd/content", "/v1/videos/x/content"):
            response = client.get(path)
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert client.delete("/v1/videos/video_nope").status_code == 404


def test_api_key_guards_everything_but_health_and_page(make_api):
    with make_api(run_jobs=False, api_key="s3cret") as (client, _):
        for path in ("/v1/models", "/v1/videos", "/v1/status"):
            denied = client.get(path)
            assert denied.status_code == 401 and denied.headers["WWW-Authenticate"] == "Bearer"
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(client, {"prompt": "a cat", **SMALL}).status_code == 401
        for path in ("/healthz", "/", "/static/app.js", "/static/style.css"):
            assert client.get(path).status_code == 200


def test_models_card_carries_defaults_choices_limits(make_api):
    with make_api(run_jobs=False, **I2V) as (client, _):
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert cards["tiny-i2v"]["task"] == "i2v" and cards["tiny-t2v"]["task"] == "t2v"
        assert cards["tiny-i2v"]["defaults"]["adaptive_resolution"] is True
        assert {"original", "sagesla"} <= set(cards["tiny-t2v"]["choices"]["attention_type"])
        assert cards["tiny-t2v"]["defaults"]["attention_type"] == "sagesla"
        assert cards["tiny-t2v"]["limits"]["fps"] == 16 and cards["tiny-t2v"]["defaults"]["num_frames"] == 81


def test_image_as_data_url_in_json_and_as_openai_object_form(make_api):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(128, 128)).decode()
    with make_api(run_jobs=False, models=["tiny-i2v"]) as (client, context):
        as_json = post(client, {"prompt": "go", **SMALL, "input_reference": {"image_url": data_url}})
        as_form = client.post("/v1/videos", data={"prompt": "go", "size": "128x128", "num_frames": "5",
                                                  "num_steps": "2", "input_reference[image_url]": data_url})  # fmt: skip
        for response in (as_json, as_form):
            assert response.status_code == 200, response.text
            record = context.store.get(response.json()["id"])
            assert context.storage.path(record.spec.image_path).read_bytes() == png_bytes(128, 128)
        assert only_error(post(client, {"prompt": "go", **SMALL, "input_reference": {"file_id": "file_1"}}))["param"] == (
            "input_reference.file_id"
        )
