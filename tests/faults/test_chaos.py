"""A short fault-injection run in `make test`: one round of each fault against real
processes, no violation of README, Faults's invariants (`make faults` runs hundreds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.chaos import FAULTS, run, table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_one_round_of_each_fault_breaks_no_invariant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = run(len(FAULTS), seed=13, root=tmp_path / "chaos")
    with capsys.disabled():
        print("\n" + table(results))
    assert [r.fault for r in results] == list(FAULTS)
    assert all(r.videos for r in results)
    assert [v for r in results for v in r.violations] == []


def test_the_checker_sees_a_repeat_a_silent_gap_and_a_missing_end() -> None:
    from tests.faults.chaos import seq_problems

    def log(seq: int, **extra: object) -> dict[str, object]:
        return {"seq": seq, "type": "log", **extra}

    complete = {"seq": 105, "type": "complete"}
    assert seq_problems([log(1), log(2), log(4), {**complete, "seq": 5}]) == [
        "gap 2 -> 4 without history_lost"
    ]
    assert seq_problems([log(1), log(2), log(2), {**complete, "seq": 3}]) == ["seq 2 after 2"]
    assert seq_problems([log(1), log(2)]) == ["last event is log, not complete"]
    # A gap closed by the notice is what README, Faults allows.
    notice = log(104, code="history_lost")
    assert seq_problems([log(1), log(2), notice, complete]) == []
