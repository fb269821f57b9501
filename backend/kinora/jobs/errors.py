"""How a generation can fail, as the model, the reference image or the clock says it,
and whether trying again may help: the job rules, the worker and the API all speak
these (the engines raise them)."""

from __future__ import annotations


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
