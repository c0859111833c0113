"""Time-series lifecycle: partitions ahead, default-partition moves, rollups, retention."""
