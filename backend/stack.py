"""``cocoon up``: the whole stack on one machine with embedded defaults.

Today: the schema is upgraded, then the web server runs. The inference path adds Redis and a
worker, the bot issue adds the bot when a token is set, the payments issue adds the watcher.
"""

from __future__ import annotations

from backend.db import upgrade_database
from backend.settings import Settings
from backend.web import run_web


def run_stack(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.db_url)
    print(f"cocoon: data in {settings.data_dir}", flush=True)
    run_web(settings, host=host, port=port)
    return 0
