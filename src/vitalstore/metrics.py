"""Prometheus metrics of the service, in the default registry that `/metrics` exposes."""

from __future__ import annotations

from prometheus_client import Counter

AUTH_FAILURES = Counter(
    "vitalstore_auth_failures",
    "Requests refused by access control, by reason: missing, malformed, unknown or revoked"
    " key (401); scope or prefix (403)",
    ["reason"],
)
