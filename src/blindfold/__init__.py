"""blindfold: an edge network that absorbs floods, filters clients and caches without holding
the site's TLS key or reading its visitors' plaintext."""

__version__ = "0.1.0"
