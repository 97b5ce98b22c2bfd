"""The only code that touches sockets, the event loop and the clock."""
