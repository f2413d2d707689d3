"""With an API key set, every route in the app's route table needs it, except liveness and the web
page with its static files. The routes come from the app itself, so a route added later is covered
by this test without anyone listing it."""

from __future__ import annotations

import re

from starlette.routing import Mount

KEY = "s3cret-key"
PUBLIC = {"/healthz", "/", "/static"}
SAMPLE = {"video_id": "video_" + "0" * 32, "path": "app.js"}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: SAMPLE.get(m[1], "x"), path)


def route_table(app):
    """Every route, those of included routers flattened (FastAPI >= 0.13x nests them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def every_request(app):
    """(route path, method, concrete URL) for every method of every route, mounts included."""
    for route in route_table(app):
        if isinstance(getattr(route, "original_route", route), Mount):
            yield route.path, "GET", f"{route.path}/{SAMPLE['path']}"
            continue
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                yield route.path, method, concrete(route.path)


def test_every_route_but_health_and_page_needs_the_key(make_api):
    with make_api(run_jobs=False, api_key=KEY, sync_timeout_s=0.05) as (client, _):
        requests = list(every_request(client.app))
        assert len({path for path, _, _ in requests}) >= 12  # /v1/* plus FastAPI's docs and schema
        answered_without_key = set()
        for path, method, url in requests:
            body = {"json": {"prompt": "a cat", "size": "64x64", "num_frames": 1, "num_steps": 1}} if method == "POST" else {}
            bare = client.request(method, url, **body)
            wrong = client.request(method, url, headers={"Authorization": f"Bearer {KEY}x"}, **body)
            basic = client.request(method, url, headers={"Authorization": f"Basic {KEY}"}, **body)
            right = client.request(method, url, headers={"Authorization": f"Bearer {KEY}"}, **body)
            assert right.status_code != 401, (method, url, right.text[:200])
            if bare.status_code != 401:
                answered_without_key.add(path)
                assert bare.status_code == 200, (method, url, bare.status_code)
                continue
            for response in (bare, wrong, basic):
                assert response.status_code == 401, (method, url, response.status_code)
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert answered_without_key == PUBLIC


def test_unknown_paths_need_the_key_too(make_api):
    with make_api(run_jobs=False, api_key=KEY) as (client, _):
        assert client.get("/v2/secret").status_code == 401
        assert client.get("/v2/secret", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
        assert client.get("/static/../v1/models").status_code in (401, 404)


def test_no_key_configured_means_open(make_api):
    with make_api(run_jobs=False) as (client, _):
        assert client.get("/v1/models").status_code == 200 and client.get("/openapi.json").status_code == 200
