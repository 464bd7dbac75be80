"""Embedded infrastructure for one machine and for the tests: the Tansu broker and throwaway PostgreSQL servers."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (the kernel picks it); another process could still take it
    before it is used."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
