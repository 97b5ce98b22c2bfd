"""Sans-IO protocol cores: bytes and events in, bytes and decisions out, time passed in."""
