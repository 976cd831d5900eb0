"""Route handlers only: thin wrappers over readings, ingest and queries."""
