"""The edge process: a master that owns listeners and the admin endpoint, and workers that
accept, filter and relay connections."""
