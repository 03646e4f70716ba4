"""The admin bearer token: from TUBERUNNER_ADMIN_TOKEN, or generated on first start and printed once.

Only its SHA-256 is stored; requests are checked by comparing digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys

from sqlalchemy import select
from starlette.requests import Request

from tuberunner.coordinator.database import Database
from tuberunner.coordinator.problems import Unauthorized
from tuberunner.coordinator.schema import settings

_KEY = "admin_token_sha256"
ADMIN_TOKEN_PREFIX = "tra-"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AdminAuth:
    def __init__(self, db: Database, configured: str | None) -> None:
        self.db = db
        self.configured = configured
        self._digest: str | None = None

    async def ensure(self) -> str | None:
        """Load or create the token; returns a newly generated token (to print once), else None."""
        created: str | None = None
        async with self.db.write() as conn:
            stored = (await conn.execute(select(settings.c.value).where(settings.c.key == _KEY))).scalar()
            if self.configured:
                wanted = _digest(self.configured)
            elif stored is None:
                created = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
                wanted = _digest(created)
            else:
                wanted = stored
            if stored is None:
                await conn.execute(settings.insert().values(key=_KEY, value=wanted))
            elif stored != wanted:
                await conn.execute(settings.update().where(settings.c.key == _KEY).values(value=wanted))
        self._digest = wanted
        return created

    def check(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authentication required: send the admin token as a bearer token")
        if self._digest is None or not hmac.compare_digest(_digest(token.strip()), self._digest):
            raise Unauthorized("Invalid admin token")


def announce_new_token(token: str) -> None:
    """Printed once, to the terminal of whoever started the coordinator; never logged."""
    print(
        f"\nA new admin token was generated (shown only this once, store it):\n\n    {token}\n\n"
        "Set TUBERUNNER_ADMIN_TOKEN to it for the CLI client verbs.\n",
        file=sys.stderr,
        flush=True,
    )
