"""Users of the test databases: the session's admin every write of a test acts as, and
users of a given role made on demand."""

from __future__ import annotations

import uuid
from functools import lru_cache

import asyncpg
from argon2 import PasswordHasher

TEST_ADMIN = "admin@fleet.test"
"""The admin the session database is seeded with; the CLI helper acts as them (FLEET_ACTOR)."""
TEST_PASSWORD = "correct horse battery"
TEST_JWT_SECRET = "the test deployment's token secret, 32+ bytes"
"""FLEET_JWT_SECRET of the ``fleet`` subprocesses the tests run."""


@lru_cache(maxsize=1)
def password_hash() -> str:
    return PasswordHasher().hash(TEST_PASSWORD)


async def make_user(conn: asyncpg.Connection, email: str | None = None, role: str = "admin",
                    *, active: bool = True) -> uuid.UUID:
    """Inserts a user (a fresh e-mail unless given) with TEST_PASSWORD; returns their id."""
    email = email or f"{role}-{uuid.uuid4().hex[:10]}@fleet.test"
    user_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO users (email, password_hash, role, is_active) VALUES ($1, $2, $3, $4) RETURNING id",
        email, password_hash(), role, active)
    return user_id


async def seed(database_url: str) -> None:
    """The session's admin, TEST_ADMIN."""
    conn = await asyncpg.connect(database_url)
    try:
        await make_user(conn, TEST_ADMIN, "admin")
    finally:
        await conn.close()
