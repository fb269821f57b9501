"""The Celery side: import a CSV one row at a time, publishing live progress."""

from __future__ import annotations

import csv
import io
import os
import time
from typing import Any

from celery import Celery

from kinora.streaming import SQLStore, SSELogger

BROKER_URL = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")
ROW_SECONDS = float(os.environ.get("ROW_SECONDS", "0.05"))  # a slow import, to watch
# Where each import's floor and outcome are kept, so its stream still ends with its
# outcome when Redis loses the events (`pip install 'kinora[store]'`); optional.
STORE = SQLStore(os.environ["STORE_URL"]) if os.environ.get("STORE_URL") else None

app = Celery("csv_import", broker=BROKER_URL)
app.conf.task_default_queue = "csv_import"


@app.task(bind=True, name="csv_import.import_csv")  # type: ignore[untyped-decorator]
def import_csv(self: Any, text: str) -> dict[str, int]:
    rows = list(csv.DictReader(io.StringIO(text)))
    imported = 0
    # The job id is this task's id; the events go to REDIS_URL, else the broker's Redis.
    with SSELogger.for_task(self, store=STORE) as log:
        log.log(f"{len(rows)} rows to import")
        for number, row in enumerate(rows, 1):
            time.sleep(ROW_SECONDS)  # the real work: write the row somewhere
            email = (row.get("email") or "").strip()
            imported += bool(email)
            log.update(number, len(rows), f"row {number}: {email or 'skipped, no email'}")
        log.complete(imported=imported, rows=len(rows))
    return {"imported": imported, "rows": len(rows)}
