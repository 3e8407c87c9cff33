"""The Telegram Mini App: wallet (TON Connect), top-ups, balance and history, the provider
dashboard and a web chat, served by ``cocoon web`` under ``/app``."""

from miniapp.routes import setup

__all__ = ["setup"]
