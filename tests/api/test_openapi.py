"""Property-based checks of the running API against its own OpenAPI schema: for any
input the schema allows, and for inputs it does not, no request gets a 500."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from tests.utils.accounts import make_account
from tests.utils.processes import Stack

pytestmark = pytest.mark.slow


# Driven through Hypothesis directly: schemathesis's pytest integration
# (`from_fixture`) does not run under pytest 9.
@pytest.mark.timeout(300)
def test_no_input_makes_the_api_fail(stack: Stack) -> None:
    # Credits for a few videos: the first valid submissions are accepted (202), the
    # rest meet 402 and the rate limit (429), without tying up the worker.
    account = make_account(credits=300)
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    assert len(operations) >= 10, [op.label for op in operations]
    failures: list[str] = []
    calls = 0
    for operation in operations:
        # Negative cases need an input to break: none for an operation that takes none.
        modes = [GenerationMode.POSITIVE]
        if operation.path_parameters or operation.query or operation.body:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
            def call(case: Any) -> None:
                nonlocal calls
                calls += 1
                # A stream's answer is its head: its body may last half an hour (the
                # caller's running videos), and a 500 would be in the status line.
                streaming = case.path.endswith("stream")
                response = case.call(
                    base_url=stack.base_url,
                    headers={**account.headers, **(case.headers or {})},
                    timeout=15,
                    stream=streaming,
                )
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}"
                        f" -> {response.status_code}: {response.text[:200]}"
                    )

            call()
    assert not failures, "\n".join(failures[:10])
    assert calls >= 100  # the run was not vacuous
