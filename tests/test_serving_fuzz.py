"""API fuzz from the live app's own OpenAPI spec (schemathesis): whatever the generated
request, the server answers without a 5xx. Bounded: a few examples per operation,
no example database written to the repository, well under a minute.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed (pip install schemathesis==4.32.5)")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from lookalike.serving.app import create_app  # noqa: E402
from lookalike.serving.backend import Backend, load_backend  # noqa: E402
from lookalike.serving.server import serve_in_thread  # noqa: E402

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def backend(indexed_store) -> Backend:
    return load_backend(indexed_store.root)


def test_no_server_errors(backend: Backend) -> None:
    app = create_app(lambda: backend, max_upload_bytes=64 * 1024, admin_token="fuzz-token")
    failures: list[str] = []
    statuses: list[int] = []
    with serve_in_thread(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 10, [op.label for op in operations]

        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                response = case.call(timeout=30)
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")

            fuzz()
    assert failures == []
    assert len(statuses) >= 3 * len(operations) and 200 in statuses and 422 in statuses
