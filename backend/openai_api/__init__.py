"""The OpenAI-compatible HTTP API (``/v1``): request and response bodies in ``protocol``, the
turn logic in ``service``, the aiohttp handlers in ``routes``."""

from backend.openai_api.routes import setup_routes

__all__ = ["setup_routes"]
