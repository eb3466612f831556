"""An embedded PostgreSQL for ``make run`` when DATABASE_URL is not set.

pgserver (an optional extra) ships PostgreSQL in a wheel. The data folder
lives under DATA_DIR, so data survives a restart; the server stops when the
process that started it exits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedPostgres"]

log = logging.getLogger("gateway.embedded")


class EmbeddedPostgres:
    def __init__(self, data_dir: str, database: str = "gateway") -> None:
        self.directory = Path(data_dir).resolve() / "pg"
        self.database = database
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server; returns its URL for asyncpg."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers).
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver
        # pgserver logs every initdb/pg_ctl command line and its output at INFO.
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(  # type: ignore[attr-defined]
            self.directory, cleanup_mode="stop"
        )
        if self.database != "postgres":
            exists = self._server.psql(
                f"select 1 from pg_database where datname = '{self.database}';"
            )
            if "1 row" not in exists:
                self._server.psql(f'create database "{self.database}";')
        url: str = self._server.get_uri(self.database)
        log.info("DATABASE_URL not set: embedded PostgreSQL with data in %s", self.directory)
        return url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()
