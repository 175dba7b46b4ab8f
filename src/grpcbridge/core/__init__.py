"""The sans-I/O core: wire rules, limits, admission and configuration.

Nothing in this package touches sockets, event loops, websockets or grpc. Every adapter
(asyncio bridge, forwarder, ASGI app, browser transport) applies these rules.
"""
