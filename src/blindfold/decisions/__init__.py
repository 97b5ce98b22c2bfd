"""Decisions (bans) created at the origin and enforced by every edge."""
