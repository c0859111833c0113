"""The gateway side: the producer, the simulated fleet and topic creation."""
