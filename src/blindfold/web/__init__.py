"""HTTP/1.1 and HTTP/2 serving (h11, h2) and an HTTP/1.1 upstream client, over any asyncio
transport: the origin agent runs them over Python's TLS, the keyless edge over its own."""
