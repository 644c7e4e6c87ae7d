"""The Prometheus text format's one escaping rule, shared by ``/metrics`` and the daemon's counters."""

from __future__ import annotations


def label(value: str) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")
