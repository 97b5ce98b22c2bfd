"""Blind delivery: sealing a static tree (`blindfold seal`), serving sealed blobs, and the
client that fetches, verifies and opens them (`blindfold fetch`)."""
