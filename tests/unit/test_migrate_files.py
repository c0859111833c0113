"""The migration files themselves: naming, order, and the commenting rule (no database)."""

from __future__ import annotations

import re

from fleet_telemetry.schema.migrate import load_migrations, postgis_install_hint

# Definitions that must say which query or rule they serve (STYLE.md, "SQL is SQL").
_NEEDS_COMMENT = re.compile(r"^\s*(CREATE (UNIQUE )?INDEX|CONSTRAINT \w+ EXCLUDE)", re.IGNORECASE)


def test_migrations_are_numbered_in_increasing_order() -> None:
    # Numbers are unique and increasing; gaps are allowed (each feature area has a range).
    migrations = load_migrations()
    numbers = [int(m.version[:4]) for m in migrations]
    assert numbers == sorted(set(numbers))
    assert numbers[0] == 1
    assert all(len(m.checksum) == 64 for m in migrations)


def test_loading_twice_gives_the_same_checksums() -> None:
    assert [m.checksum for m in load_migrations()] == [m.checksum for m in load_migrations()]


def test_every_index_and_exclusion_constraint_says_what_it_serves() -> None:
    uncommented: list[str] = []
    for migration in load_migrations():
        lines = migration.sql.splitlines()
        for number, line in enumerate(lines):
            if _NEEDS_COMMENT.match(line) and (
                number == 0 or not lines[number - 1].strip().startswith("--")
            ):
                uncommented.append(f"{migration.filename}:{number + 1}: {line.strip()}")
    assert uncommented == []


def test_postgis_hint_names_the_servers_major_version() -> None:
    assert postgis_install_hint(150020) == "apt-get install postgresql-15-postgis-3"
    assert postgis_install_hint(160004) == "apt-get install postgresql-16-postgis-3"
