"""A listening socket whose URL is known before serving: `--port 0` picks a free port, and a service prints (or
registers) the URL it got. Shared by the router's services, the transparency log server and an attested node.
"""
from __future__ import annotations

import socket


def bind(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket. proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets
    that say so, and without it every streamed chunk after the first waits ~40 ms for a delayed ACK (Nagle).
    Listening at once means connections that arrive before the server's accept loop runs wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
