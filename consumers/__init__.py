"""Everything downstream of Kafka: decoding, the sink, Redis status, dead letters, the worker loop."""
