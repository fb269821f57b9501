"""The HTTP API: videos, the SSE stream, operations endpoints."""
