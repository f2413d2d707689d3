"""Schemathesis against the app's own OpenAPI document, in-process: a bounded number of generated
requests per operation, valid and invalid, must never get a 5xx, and every response must match what
the document says (status codes, content types, headers, bodies).

The operations are driven with Hypothesis directly rather than through schemathesis' pytest plugin,
whose lazy fixture loader does not run on pytest 9."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES_PER_OPERATION = 50
# Not checked: that schema-valid requests are accepted. Rules across fields or on arithmetic (4n+1
# frames, multiples of 16, pixel limits, served models, control characters) are not JSON Schema, so
# a schema-valid request can rightly get a 422; that the 422 is documented and well-formed is checked.
from schemathesis.checks import positive_data_acceptance  # noqa: E402


def without_lifespan(app):
    """The app with its lifespan skipped, so no job runner starts: created jobs stay queued."""

    async def asgi(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    return asgi


def run_operation(operation, mode: GenerationMode) -> str | None:
    """The first failure of `operation` in `mode` as text, or None."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case):
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    try:
        check()
    except Unsatisfiable:  # no invalid input exists (e.g. a route without parameters)
        assert mode is GenerationMode.NEGATIVE, operation.label
    except Exception as error:  # noqa: BLE001 - reported with the operation's name below
        return f"{operation.label} [{mode.value}]: {error}"
    return None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_generated_requests_get_no_5xx_and_match_the_schema(make_api):
    # Jobs stay queued and /sync times out at once, so every route answers in milliseconds.
    with make_api(run_jobs=False, max_queued_jobs=3, sync_timeout_s=0.05) as (client, _):
        schema = schemathesis.openapi.from_asgi("/openapi.json", without_lifespan(client.app))
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {"POST /v1/videos", "GET /v1/videos/{video_id}/content", "GET /v1/status"}
        failures = [f for op in operations for mode in GenerationMode if (f := run_operation(op, mode))]
    assert not failures, "\n\n".join(failures)
