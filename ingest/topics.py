"""Creating the pipeline's topics when they do not exist yet (local stack, tests, demo).

Production clusters usually manage topics themselves; creating one that exists is a no-op.
"""

from __future__ import annotations

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from fleet_telemetry.core.settings import Settings

log = structlog.get_logger("fleet.topics")


async def ensure_topics(settings: Settings, names: list[str], partitions: int = 8,
                        replication_factor: int = 1) -> list[str]:
    """Create the topics of ``names`` that are missing; returns the ones created."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())  # type: ignore[arg-type]
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)
                     for name in missing]
                )
            except TopicAlreadyExistsError:
                pass  # another process created it between our list and create
        return missing
    finally:
        await admin.close()


async def ensure_topics_if_allowed(settings: Settings, names: list[str], partitions: int = 8) -> list[str]:
    """:func:`ensure_topics` for a long-running command: a cluster that manages its topics
    itself may refuse (or not answer the admin requests); then a warning says so and the
    topics are expected to exist. Returns the ones created."""
    try:
        created = await ensure_topics(settings, names, partitions=partitions)
    except KafkaError as exc:
        log.warning("could not make sure the topics exist", topics=names, error=type(exc).__name__)
        return []
    if created:
        log.info("topics created", topics=created, partitions=partitions)
    return created
