"""Accepting WebSocket connections and serving gRPC through them."""
