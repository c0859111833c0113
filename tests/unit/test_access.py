"""Command tokens and the roles table, pure: signed, checked and refused with a reason
that never quotes the token or the key; every command type's writer asks for a permission."""

from __future__ import annotations

import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.redis_keys import RedisKeys
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops import access, commands, sessions
from fleet_telemetry.fleetops.access import WRITES, Actor, roles_table
from fleet_telemetry.fleetops.tokens import TokenKeys, Unauthenticated, issue, verify

SECRET = "a unit-test secret that is long enough"
NOW = 1_900_000_000.0
USER = uuid.UUID(int=7)


def hs256(**changes: object) -> TokenKeys:
    settings = Settings(_env_file=None, jwt_secret=SecretStr(SECRET), **changes)  # type: ignore[arg-type]
    keys = TokenKeys.from_settings(settings)
    assert keys is not None
    return keys


def test_a_token_round_trips_with_its_claims() -> None:
    keys = hs256()
    token, claims = issue(keys, USER, ttl_seconds=600, now=NOW)
    assert verify(keys, token, now=NOW + 599) == claims
    assert (claims.user_id, claims.issued_at, claims.expires_at) == (USER, int(NOW), int(NOW) + 600)
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], audience="fleet-commands", options={"verify_exp": False, "verify_iat": False})
    assert set(payload) == {"sub", "iss", "aud", "iat", "exp", "jti"} and payload["iss"] == "fleet-telemetry"


@pytest.mark.parametrize(("make", "detail"), [
    (lambda k: issue(k, USER, ttl_seconds=60, now=NOW - 61)[0], "the token has expired"),
    (lambda k: jwt.encode({"sub": str(USER), "iss": "fleet-telemetry", "aud": "fleet-commands", "iat": int(NOW),
                           "exp": int(NOW) + 60, "jti": "j"}, "another key of thirty-two bytes or more", "HS256"),
     "the token's signature does not verify"),
    (lambda k: issue(hs256(jwt_audience="elsewhere"), USER, ttl_seconds=60, now=NOW)[0],
     "the token is not for audience fleet-commands"),
    (lambda k: issue(hs256(jwt_issuer="someone"), USER, ttl_seconds=60, now=NOW)[0],
     "the token was not issued by fleet-telemetry"),
    (lambda k: jwt.encode({"sub": str(USER), "iss": "fleet-telemetry", "aud": "fleet-commands", "iat": int(NOW),
                           "exp": int(NOW) + 60}, SECRET, "HS256"), "the token lacks claim 'jti'"),
    (lambda k: jwt.encode({"sub": str(USER), "iss": "fleet-telemetry", "aud": "fleet-commands", "iat": int(NOW),
                           "exp": int(NOW) + 90_000, "jti": "j"}, SECRET, "HS256"),
     "the token lives longer than FLEET_JWT_MAX_TTL_SECONDS"),
    (lambda k: jwt.encode({"sub": str(USER), "iss": "fleet-telemetry", "aud": "fleet-commands", "iat": int(NOW),
                           "exp": int(NOW) + 60, "jti": "j"}, None, "none"),
     "the token is malformed or signed with another algorithm"),
    (lambda k: "not.a.token", "the token is malformed or signed with another algorithm"),
    (lambda k: None, "the command carries no token"),
])
def test_bad_tokens_are_refused_with_a_sentence(make: object, detail: str) -> None:
    keys = hs256()
    token = make(keys)  # type: ignore[operator]
    with pytest.raises(Unauthenticated) as refused:
        verify(keys, token, now=NOW)
    assert str(refused.value) == detail and refused.value.reason == "unauthenticated"
    assert SECRET not in str(refused.value) and (not token or token not in str(refused.value))


def test_rs256_signs_with_the_private_key_and_verifies_with_the_public_one(tmp_path: object) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    issuer = TokenKeys.from_settings(Settings(_env_file=None, jwt_private_key=SecretStr(private_pem),  # type: ignore[call-arg]
                                              jwt_public_key=public_pem))
    verifier = TokenKeys.from_settings(Settings(_env_file=None, jwt_public_key=public_pem))  # type: ignore[call-arg]
    assert issuer is not None and verifier is not None and verifier.algorithm == "RS256"
    token, claims = issue(issuer, USER, ttl_seconds=60, now=NOW)
    assert verify(verifier, token, now=NOW) == claims
    assert "PRIVATE" not in repr(issuer) and private_pem not in repr(issuer)
    with pytest.raises(UsageError, match="FLEET_JWT_PRIVATE_KEY is not set"):
        issue(verifier, USER, ttl_seconds=60, now=NOW)
    hs_token, _ = issue(hs256(), USER, ttl_seconds=60, now=NOW)
    with pytest.raises(Unauthenticated):  # an HS256 token signed with the public key's text is refused
        verify(verifier, hs_token, now=NOW)


def test_token_settings_are_checked_and_never_shown() -> None:
    assert TokenKeys.from_settings(Settings(_env_file=None)) is None  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="at least 32 bytes"):
        TokenKeys.from_settings(Settings(_env_file=None, jwt_secret=SecretStr("short")))  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="--ttl must be between 1 and 86400"):
        issue(hs256(), USER, ttl_seconds=86_401, now=NOW)
    settings = Settings(_env_file=None, jwt_secret=SecretStr(SECRET))  # type: ignore[call-arg]
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    assert SECRET not in repr(hs256())


def test_session_keys_carry_the_prefix_and_hash_tags() -> None:
    assert RedisKeys("fleet-a:").user_session(USER) == f"fleet-a:user:{USER}:session"
    assert RedisKeys("fleet-a:").driver_session(USER) == f"fleet-a:driver:{USER}:session"
    assert RedisKeys("", hash_tags=True).user_session(USER) == f"user:{{{USER}}}:session"


def test_an_actor_may_what_its_role_grants() -> None:
    admin = Actor(USER, "a@x.y", "admin", frozenset({"*"}))
    mechanic = Actor(USER, "m@x.y", "mechanic", frozenset({"maintenance:write"}))
    assert admin.may("users:write") and mechanic.may("maintenance:write") and not mechanic.may("jobs:write")
    assert str(admin) == str(USER)


def test_every_command_type_runs_a_writer_that_asks_for_a_write_permission() -> None:
    from fleet_telemetry.fleetops import assignments, customers, drivers, jobs, maintenance, vehicles

    writers = [getattr(module, name) for module in (assignments, customers, drivers, jobs, maintenance, vehicles)
               for name in dir(module) if getattr(getattr(module, name), "permission", None)]
    asked = {w.permission for w in writers}
    assert asked == {"vehicles:write", "drivers:write", "customers:write", "assignments:write", "jobs:write",
                     "maintenance:write"} <= set(WRITES)
    assert len(writers) == 21 == len(commands.HANDLERS)
    with pytest.raises(ValueError):
        access.requires("vehicles:paint")


def test_the_roles_table_has_a_row_per_write_and_a_column_per_role() -> None:
    table = roles_table([{"name": "admin", "permissions": ["*"]}, {"name": "mechanic",
                                                                 "permissions": ["maintenance:write"]}])
    lines = table.splitlines()
    assert lines[0] == "| write permission | allows | admin | mechanic |" and len(lines) == 2 + len(WRITES)
    assert "| `maintenance:write` | record services; add and change schedules | yes | yes |" in lines
    assert "| `users:write` | add, disable, delete users; set roles and passwords; issue and revoke tokens | yes | - |" \
        in lines


def test_rs256_keys_may_be_given_as_files(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / "private.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "public.pem").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    keys = TokenKeys.from_settings(Settings(_env_file=None,  # type: ignore[call-arg]
                                            jwt_private_key=SecretStr(str(folder / "private.pem")),
                                            jwt_public_key=str(folder / "public.pem")))
    assert keys is not None and keys.algorithm == "RS256"
    token, claims = issue(keys, USER, ttl_seconds=60, now=NOW)
    assert verify(keys, token, now=NOW) == claims
    with pytest.raises(UsageError, match="FLEET_JWT_PUBLIC_KEY: cannot read the key file"):
        TokenKeys.from_settings(Settings(_env_file=None, jwt_public_key=str(folder / "absent.pem")))  # type: ignore[call-arg]


class RecordingRedis:
    """Answers GET and MGET from a dict and records each command sent."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values
        self.sent: list[tuple[str, ...]] = []

    async def get(self, key: str) -> bytes | None:
        self.sent.append(("GET", key))
        return self.values.get(key)

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self.sent.append(("MGET", *keys))
        return [self.values.get(k) for k in keys]


@pytest.mark.parametrize("cluster", [False, True])
async def test_the_latest_revocation_of_the_user_and_driver_keys_counts(
    cluster: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "is_cluster_client", lambda client: cluster)
    redis = RecordingRedis({"user:u:session": b"100", "driver:d:session": b"250"})
    assert await sessions.revoked_at(redis, ["user:u:session", "driver:d:session"]) == 250  # type: ignore[arg-type]
    assert await sessions.revoked_at(redis, ["user:u:session", "driver:x:session"]) == 100  # type: ignore[arg-type]
    assert await sessions.revoked_at(redis, ["user:none:session"]) is None  # type: ignore[arg-type]
    if cluster:  # the two keys live in different slots: one GET each
        assert redis.sent[:2] == [("GET", "user:u:session"), ("GET", "driver:d:session")]
    else:  # one round trip
        assert redis.sent[:2] == [("MGET", "user:u:session", "driver:d:session"),
                                  ("MGET", "user:u:session", "driver:x:session")]
