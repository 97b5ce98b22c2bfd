"""Observability: Prometheus text metrics and JSON-lines logs."""
