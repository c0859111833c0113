"""``python -m fleet_telemetry.cli``: the same as the ``fleet`` command."""

import sys

from fleet_telemetry.cli.main import main

sys.exit(main())
