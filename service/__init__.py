"""The gateway process: the WebSocket and HTTP API, the Redis journal, recovery, the CLI.

Everything here is I/O around `matcher.engine.Engine`, which stays pure.
"""
