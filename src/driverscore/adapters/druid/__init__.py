"""A local single-machine Apache Druid (``druid.sh``) and the Kafka supervisor specs that
feed it from the scores and alerts topics (docs/store.md)."""
