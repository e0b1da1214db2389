"""The service plumbing: sockets that do not add 40 ms per streamed chunk, logs without tracebacks."""
import logging
import socket
import sys

from ccserve.listen import bind
from ccserve.router.serve import _NoTracebacks


def test_listening_socket_gets_tcp_nodelay_connections():
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP     # asyncio only sets TCP_NODELAY when proto says TCP
    finally:
        sock.close()


def test_tracebacks_are_reduced_to_the_exception_type():
    try:
        raise ValueError("prompt: my secret medical question")
    except ValueError:
        record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application",
                                   None, sys.exc_info())
    assert _NoTracebacks().filter(record)
    text = logging.Formatter().format(record)
    assert "secret" not in text and "Traceback" not in text and "ValueError" in text
