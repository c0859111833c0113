"""Secrets in the settings: passwords (in a URL's user part or its query string, and the
SASL password) never show in the settings' text form, a dump or an error, while the code
that connects still gets them."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from pydantic import ValidationError

from fleet_telemetry.core.settings import Settings, mask_url

_SECRETS = ("hunter2", "s3cr%40t", "s3cr@t", "q-secret", "sasl-secret", "replica-pw")


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://fleet:hunter2@db:5432/fleet", "postgresql://fleet:***@db:5432/fleet"),
    ("postgresql://fleet@db/fleet?password=hunter2&sslmode=require",
     "postgresql://fleet@db/fleet?password=***&sslmode=require"),
    ("postgresql://db/fleet?sslmode=require&user=fleet&PassWord=hunter2",
     "postgresql://db/fleet?sslmode=require&user=fleet&PassWord=***"),
    ("postgresql://fleet@db/fleet?sslpassword=hunter2", "postgresql://fleet@db/fleet?sslpassword=***"),
    ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
    ("redis://cache:6379/0?password=hunter2", "redis://cache:6379/0?password=***"),
    ("postgresql://fleet@db/fleet", "postgresql://fleet@db/fleet"),
    ("postgresql://db/fleet?sslmode=require", "postgresql://db/fleet?sslmode=require"),
])
def test_mask_url_hides_every_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


_DATABASE = "postgresql://fleet:s3cr%40t@db:5432/fleet?sslmode=require"
_REDIS = "redis://cache:6379/0?password=q-secret"
_REPLICA = "postgresql://fleet@replica/fleet?password=replica-pw"


def _leaks(text: str) -> list[str]:
    return [secret for secret in _SECRETS if secret in text]


def test_the_settings_text_form_and_dumps_hold_no_password() -> None:
    s = _settings(database_url=_DATABASE, redis_url=_REDIS, database_replica_urls=_REPLICA,
                  kafka_sasl_password="sasl-secret")
    for text in (repr(s), str(s), repr(s.model_dump()), s.model_dump_json(), repr(s.database_url),
                 repr(s.database_replica_urls), repr(s.redis_url), f"{s!r}"):
        assert _leaks(text) == [], text
    assert "postgresql://fleet:***@db:5432/fleet?sslmode=require" in repr(s)


def test_a_copy_with_new_urls_hides_them_too() -> None:
    s = _settings().model_copy(update={"database_url": "postgresql://fleet:hunter2@db/fleet", "redis_url": _REDIS})
    assert _leaks(repr(s)) == [] and _leaks(str(s)) == [] and _leaks(s.model_dump_json()) == []


def test_what_connects_gets_the_real_values() -> None:
    s = _settings(database_url=_DATABASE, redis_url=_REDIS, database_replica_urls=_REPLICA,
                  kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_password="sasl-secret")
    assert s.database_url == _DATABASE and f"{s.database_url}" == _DATABASE and str(s.database_url) == _DATABASE
    assert s.redis_url == _REDIS and s.database_replica_urls == (_REPLICA,)
    assert s.kafka_client_options()["sasl_plain_password"] == "sasl-secret"
    assert s.database_url_masked == "postgresql://fleet:***@db:5432/fleet?sslmode=require"
    copied = pickle.loads(pickle.dumps(s))  # how the replay hands its settings to worker processes
    assert copied.database_url == _DATABASE and copied.redis_url == _REDIS
    assert _leaks(repr(copied)) == []


def test_the_redis_client_gets_the_password_of_the_query_string() -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(_settings(redis_url=_REDIS).redis_url)
    assert client.connection_pool.connection_kwargs["password"] == "q-secret"


@pytest.mark.parametrize("values", [
    {"database_url": "mysql://fleet:hunter2@db/fleet"},
    {"database_url": "postgresql://fleet:hunter2@db:99999/fleet"},
    {"redis_url": "http://cache/?password=hunter2"},
    {"database_replica_urls": "postgresql://a/b, mysql://fleet:hunter2@db/fleet"},
])
def test_a_refused_url_is_named_without_its_password(values: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as caught:
        _settings(**values)
    assert _leaks(str(caught.value)) == []
    assert _leaks(caught.value.errors()[0]["msg"]) == []  # what ``fleet`` prints
