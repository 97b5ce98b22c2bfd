"""The origin agent: TLS with the site's real key, the WAF, the reverse proxy to the
application, and the decisions every edge enforces."""
