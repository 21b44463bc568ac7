"""Long-running services: the REST scoring API and the stream processors."""
