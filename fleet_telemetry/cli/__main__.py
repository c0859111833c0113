"""``python -m fleet_telemetry.cli``: the same as the ``fleet`` command."""

import sys

try:
    from fleet_telemetry.cli.main import main
except KeyboardInterrupt:
    sys.stderr.write("fleet: interrupted\n")
    sys.exit(130)

sys.exit(main())
