"""How the pipeline runs: the local stack on loopback, compose, Prometheus configuration."""
