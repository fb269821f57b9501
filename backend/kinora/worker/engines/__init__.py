"""Video models: the OpenAI videos API and a mock that behaves like it."""

from kinora.worker.engines.base import (
    EngineError,
    ModelJob,
    PolicyRefusal,
    TransientEngineError,
    VideoEngine,
)

__all__ = ["EngineError", "ModelJob", "PolicyRefusal", "TransientEngineError", "VideoEngine"]


def get_engine() -> VideoEngine:
    """The mock unless USE_MOCK_SORA=false and OPENAI_API_KEY is set (README, the top)."""
    from kinora.core.config import get_settings

    settings = get_settings()
    if settings.use_mock:
        from kinora.worker.engines.mock import MockEngine

        return MockEngine(step_seconds=settings.mock_step_seconds)
    from kinora.worker.engines.sora import SoraEngine

    assert settings.openai_api_key is not None  # use_mock is true without one
    return SoraEngine(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url,
        model=settings.openai_video_model,
        timeout=settings.openai_timeout_seconds,
    )
