"""How a generation can fail, as the model, the reference image or the clock says it,
and whether trying again may help: the job rules, the worker and the API all speak
these (the engines raise them)."""

from __future__ import annotations

from dataclasses import dataclass


class EngineError(Exception):
    """A failure of the model. `retryable` says whether trying again may help."""

    retryable = False

    def __init__(self, message: str, *, code: str = "model_error") -> None:
        super().__init__(message)
        self.code = code


class TransientEngineError(EngineError):
    """Network trouble, a timeout, 429 or 5xx: worth retrying."""

    retryable = True


class PolicyRefusal(EngineError):
    """The model refused the prompt for content policy: retrying cannot help."""


class VideoTimeout(EngineError):
    """VIDEO_TIMEOUT_SECONDS passed: final, never retried."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"generation took longer than {limit:g} s", code="timeout")


@dataclass(frozen=True)
class RetryPolicy:
    """Whether a failed attempt is tried again (README, How it works), decided here only:
    transient model errors and unknown exceptions are retried up to `max_retries`
    times, `countdown_seconds` apart; timeouts, bad input and content-policy refusals
    are final."""

    max_retries: int
    countdown_seconds: float

    @staticmethod
    def retryable(exc: BaseException) -> bool:
        if isinstance(exc, EngineError):
            return exc.retryable
        # A job that gives its video up on purpose (it was taken over, the worker is
        # shutting down) says so with a `silent` exception: nothing to retry.
        return isinstance(exc, Exception) and not getattr(exc, "silent", False)

    def will_retry(self, exc: BaseException, retry_count: int) -> bool:
        """Whether the attempt numbered `retry_count` (0 for the first) failing with
        `exc` is followed by another."""
        return self.retryable(exc) and retry_count < self.max_retries
