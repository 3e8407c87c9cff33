"""Typed keys for what the aiohttp application holds (never string keys)."""

from __future__ import annotations

from aiohttp import web

from backend.db import Database
from backend.dispatch import Dispatcher
from backend.ledger import Ledger
from backend.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
LEDGER = web.AppKey("ledger", Ledger)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
