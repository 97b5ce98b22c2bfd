"""Process limits a network server needs."""

from __future__ import annotations

import resource


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit (each relayed connection needs two
    descriptors, and pipes while it carries bulk data). Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
