"""Users for tests: each test makes its own, so its assertions can be exact."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from kinora.core import db
from kinora.jobs.accounts import create_user

_emails = itertools.count(1)


@dataclass
class Account:
    id: int
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_account(*, credits: int = 1000, plan: str = "pro") -> Account:
    email = f"user{next(_emails)}-{time.monotonic_ns()}@test.kinora"
    user, token = create_user(email, credits=credits, plan=plan)
    return Account(user.id, email, token)


def assert_ledger_matches_balances() -> None:
    """After everything the session did (charges, retries, refunds, cancels, crashes),
    every user's credit ledger still sums to their balance."""
    from sqlalchemy import func, select

    from kinora.core.models import CreditEntry, User

    with db.session_scope() as session:
        ledger = dict(
            session.execute(
                select(CreditEntry.user_id, func.sum(CreditEntry.amount)).group_by(
                    CreditEntry.user_id
                )
            ).all()
        )
        balances = dict(session.execute(select(User.id, User.credits)).all())
    assert {u: ledger.get(u, 0) for u in balances} == balances
