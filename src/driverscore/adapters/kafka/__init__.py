"""Apache Kafka adapters: local broker process control, topic admin, ping producer, codec."""
