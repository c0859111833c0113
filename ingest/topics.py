"""Creating the pipeline's topics when they do not exist yet (local stack, tests, demo).

Production clusters usually manage topics themselves; creating one that exists is a no-op.
"""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from fleet_telemetry.core.settings import Settings


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
