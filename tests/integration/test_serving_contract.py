"""The live API against its own OpenAPI document (schemathesis) and hostile input over real HTTP.

Runs against the session's local Ray Serve application (tests/integration/serve_config_test.yaml: the real
app with tiny-random models), so what is checked is what the proxy, the guard and the routes really answer.
Schemathesis generates valid and invalid bodies for every operation (a few hundred cases) and checks that
each answer's status is documented, its content type is the documented one and its body matches the
documented schema; and that no case gets a 5xx.
"""

from __future__ import annotations

import base64
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fakes import png_claiming

pytestmark = pytest.mark.ray

EXAMPLES = 40  # per operation and mode: 3 POST x (valid + invalid) x 40 + the 2 GETs (one case each)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _small(case: Any) -> None:
    """Keeps a generated request's model work small: the contract is checked, not the models' speed."""
    if isinstance(case.body, dict):
        for key, cap in (("num_inference_steps", 4), ("width", 64), ("height", 64)):
            value = case.body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                case.body[key] = cap


def _run_cases(operation: Any, mode: Any, url: str, cases: Counter[str], failures: list[str]) -> None:
    label = f"{operation.label} [{mode}]"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    def check(case: Any) -> None:
        _small(case)
        cases[label] += 1
        try:
            case.call_and_validate(base_url=url, checks=CHECKS, timeout=120)
        except Exception as error:  # collect every failure, not only the first
            failures.append(f"{label}: {str(error)[:300]}")

    check()


def test_every_answer_matches_the_openapi_document(serve_url):
    # schemathesis' own pytest plugin does not load under this pytest (9.x); its strategies and checks are
    # driven by Hypothesis directly instead
    schema = schemathesis.openapi.from_url(f"{serve_url}/openapi.json")
    cases: Counter[str] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            _run_cases(operation, mode, serve_url, cases, failures)
    total = sum(cases.values())
    print(f"schemathesis: {total} cases, {len(failures)} failures; per operation: {dict(cases)}")
    assert total >= 200, cases
    assert not failures, "\n".join(failures[:10])


def test_openapi_lists_every_status_with_the_error_schema(http):
    paths = http.get("/openapi.json").json()["paths"]
    expected = {
        ("/v1/preview", "post"): {"200", "401", "404", "413", "422", "429", "503"},
        ("/v1/refine", "post"): {"200", "401", "404", "413", "422", "429", "503"},
        ("/v1/generate", "post"): {"200", "401", "413", "422", "429", "503"},
        ("/v1/stats", "get"): {"200", "401", "503"},
        ("/v1/health", "get"): {"200", "503"},
    }
    for (path, method), statuses in expected.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == statuses, (path, set(responses))
        for status in statuses - {"200"}:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorResponse")
    assert "Retry-After" in paths["/v1/preview"]["post"]["responses"]["503"]["headers"]
    assert "Retry-After" in paths["/v1/refine"]["post"]["responses"]["429"]["headers"]


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"),
    [
        (b"\xff\xfe\x00{", {}, 422, "not UTF-8"),
        (b"prompt=a", {"content-type": "application/x-www-form-urlencoded"}, 422, "not valid JSON"),
        (b'{"prompt": "a", "guidance_scale": NaN}', {}, 422, "NaN and Infinity"),
        (b'{"prompt": "a", "guidance_scale": Infinity}', {}, 422, "NaN and Infinity"),
        (b"{" + b" " * (12 * 1024 * 1024 + 1) + b"}", {}, 413, "at most 12582912 bytes"),
    ],
)
def test_hostile_bodies_get_4xx_with_the_api_error_body(http, content, headers, status, message):
    response = http.post("/v1/preview", content=content, headers=headers)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and message in body["error"]


@pytest.mark.parametrize("path", ["/v1/preview", "/v1/refine"])
def test_a_decompression_bomb_gets_422(http, path):
    bomb = base64.b64encode(png_claiming(30000, 30000)).decode()
    body = {"prompt": "a", "image": bomb, **({"strength": 0.5} if path == "/v1/preview" else {})}
    response = http.post(path, json=body)
    assert response.status_code == 422, response.text
    assert "30000x30000; each side must be at most 1024" in response.json()["error"]


def test_oversize_body_without_content_length_gets_413(serve_url):
    def chunks():
        for _ in range(13):
            yield b" " * (1024 * 1024)

    response = httpx.post(f"{serve_url}/v1/preview", content=chunks(), timeout=60)
    assert response.status_code == 413 and response.json()["status"] == 413
