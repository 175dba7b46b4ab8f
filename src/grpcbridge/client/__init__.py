"""Dialing WebSocket tunnels: the local port forwarder (and, later, native channels)."""
