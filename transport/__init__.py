"""Async TCP transport: framing, zero-copy receive, handshake + auth, striped links."""
