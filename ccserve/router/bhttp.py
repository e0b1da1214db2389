"""Binary HTTP messages (RFC 9292): the plaintext inside every OHTTP encapsulation.

A request or response is framed as: framing indicator, control data (method/scheme/authority/path, or a status),
a header section, content, a trailer section, then optional zero padding. Known-length messages prefix each
section with its length; indeterminate-length ones end each section with a zero, so a response can be produced
and consumed chunk by chunk (`stream_*` and `ResponseStreamDecoder` below), which streamed LLM output needs.

Parsing is strict: a message that is truncated anywhere but at the places RFC 9292 allows, has non-zero
padding, a pseudo-field or a malformed field line is refused with MalformedMessage. Strings are latin-1, so
every byte round-trips.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ccserve.router import varint
from ccserve.router.errors import MalformedMessage, Truncated

Fields = list[tuple[str, str]]

KNOWN_REQUEST, KNOWN_RESPONSE, INDETERMINATE_REQUEST, INDETERMINATE_RESPONSE = 0, 1, 2, 3
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


@dataclass
class Request:
    method: str
    path: str
    scheme: str = "https"
    authority: str = ""
    headers: Fields = field(default_factory=list)
    content: bytes = b""
    trailers: Fields = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return _first(self.headers, name)


@dataclass
class Response:
    status: int
    headers: Fields = field(default_factory=list)
    content: bytes = b""
    trailers: Fields = field(default_factory=list)
    informational: list[tuple[int, Fields]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return _first(self.headers, name)

    def trailer(self, name: str) -> str | None:
        return _first(self.trailers, name)


def _first(fields: Fields, name: str) -> str | None:
    name = name.lower()
    return next((v for n, v in fields if n == name), None)


# ---- encoding ----------------------------------------------------------------------------------------------

def _bytes(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("latin-1")


def _prefixed(data: bytes) -> bytes:
    return varint.encode(len(data)) + data


def _field_lines(fields: Fields) -> bytes:
    out = bytearray()
    for name, value in fields:
        name_b, value_b = _bytes(name.lower()), _bytes(value)
        _check_field(name_b, value_b)
        out += _prefixed(name_b) + _prefixed(value_b)
    return bytes(out)


def _section(fields: Fields, indeterminate: bool) -> bytes:
    lines = _field_lines(fields)
    return lines + b"\x00" if indeterminate else _prefixed(lines)


def _content(content: bytes, indeterminate: bool) -> bytes:
    if not indeterminate:
        return _prefixed(content)
    return (_prefixed(content) if content else b"") + b"\x00"


def encode_request(req: Request, indeterminate: bool = False, padding: int = 0) -> bytes:
    """`req` as message/bhttp; `padding` zero bytes appended (hides the length from whoever sees ciphertext)."""
    out = bytearray(varint.encode(INDETERMINATE_REQUEST if indeterminate else KNOWN_REQUEST))
    for part in (req.method, req.scheme, req.authority, req.path):
        out += _prefixed(_bytes(part))
    out += _section(req.headers, indeterminate) + _content(req.content, indeterminate)
    out += _section(req.trailers, indeterminate) + bytes(padding)
    return bytes(out)


def encode_response(resp: Response, indeterminate: bool = False, padding: int = 0) -> bytes:
    out = bytearray(varint.encode(INDETERMINATE_RESPONSE if indeterminate else KNOWN_RESPONSE))
    for status, fields in resp.informational:
        out += varint.encode(_check_status(status, informational=True)) + _section(fields, indeterminate)
    out += varint.encode(_check_status(resp.status, informational=False)) + _section(resp.headers, indeterminate)
    out += _content(resp.content, indeterminate) + _section(resp.trailers, indeterminate) + bytes(padding)
    return bytes(out)


# Incremental production of an indeterminate-length response: head, then any number of chunks, then end.

def stream_head(status: int, headers: Fields) -> bytes:
    return varint.encode(INDETERMINATE_RESPONSE) + varint.encode(_check_status(status, False)) + \
        _section(headers, True)


def stream_chunk(data: bytes) -> bytes:
    """One content chunk; empty data encodes to nothing (a zero length would end the content)."""
    return _prefixed(data) if data else b""


def stream_end(trailers: Fields = ()) -> bytes:
    return b"\x00" + _section(list(trailers), True)


# ---- decoding ----------------------------------------------------------------------------------------------

class _Reader:
    """A cursor over a byte string; every read raises Truncated rather than run past the end."""

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def varint(self) -> int:
        value, self.pos = varint.decode(self.data, self.pos)
        return value

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Truncated("message ends inside a length-prefixed value")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def prefixed(self) -> bytes:
        return self.take(self.varint())


def _check_field(name: bytes, value: bytes) -> None:
    if not name:
        raise MalformedMessage("binary HTTP field with an empty name")
    if name[:1] == b":":
        raise MalformedMessage("binary HTTP field with a pseudo-field name (control data has its own place)")
    if not set(name) <= _TCHAR:
        raise MalformedMessage("binary HTTP field name with an invalid or upper-case character")
    if any(b in value for b in (0, 10, 13)) or value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        raise MalformedMessage("binary HTTP field value with NUL, CR, LF or surrounding whitespace")


def _check_status(status: int, informational: bool) -> int:
    ok = 100 <= status <= 199 if informational else 200 <= status <= 599
    if not ok:
        raise MalformedMessage(f"binary HTTP status {status} out of range")
    return status


def _field_line(r: _Reader, name_len: int) -> tuple[str, str]:
    name, value = r.take(name_len), r.prefixed()
    _check_field(name, value)
    return name.decode("latin-1"), value.decode("latin-1")


def _known_fields(r: _Reader) -> Fields:
    section = _Reader(r.prefixed())
    fields = []
    while not section.at_end():
        fields.append(_field_line(section, section.varint()))
    return fields


def _indeterminate_fields(r: _Reader) -> Fields:
    fields = []
    while (name_len := r.varint()) != 0:
        fields.append(_field_line(r, name_len))
    return fields


def _indeterminate_content(r: _Reader) -> bytes:
    out = bytearray()
    while (size := r.varint()) != 0:
        out += r.take(size)
    return bytes(out)


def _check_padding(r: _Reader) -> None:
    if any(r.data[r.pos:]):
        raise MalformedMessage("binary HTTP padding contains a non-zero byte")


def _tail(r: _Reader, indeterminate: bool) -> tuple[Fields, bytes, Fields]:
    """Header section, content, trailer section, padding; the message may end before any of the three parts."""
    fields_of = _indeterminate_fields if indeterminate else _known_fields
    headers = [] if r.at_end() else fields_of(r)
    content = b"" if r.at_end() else (_indeterminate_content(r) if indeterminate else r.prefixed())
    trailers = [] if r.at_end() else fields_of(r)
    _check_padding(r)
    return headers, content, trailers


def _framing(r: _Reader, request: bool) -> bool:
    """Whether the message is indeterminate-length; refuses a request where a response is due and vice versa."""
    framing = r.varint()
    if framing not in (0, 1, 2, 3):
        raise MalformedMessage(f"binary HTTP framing indicator {framing} is not 0..3")
    if (framing in (KNOWN_REQUEST, INDETERMINATE_REQUEST)) != request:
        raise MalformedMessage(f"expected a binary HTTP {'request' if request else 'response'}")
    return framing >= 2


def decode_request(data: bytes) -> Request:
    r = _Reader(data)
    try:
        indeterminate = _framing(r, request=True)
        method, scheme, authority, path = (r.prefixed().decode("latin-1") for _ in range(4))
        headers, content, trailers = _tail(r, indeterminate)
    except Truncated as exc:
        raise MalformedMessage(f"truncated binary HTTP request: {exc}") from None
    if not method or not path:
        raise MalformedMessage("binary HTTP request without a method or path")
    return Request(method, path, scheme, authority, headers, content, trailers)


def decode_response(data: bytes) -> Response:
    r = _Reader(data)
    try:
        indeterminate = _framing(r, request=False)
        informational = []
        while 100 <= (status := r.varint()) <= 199:
            informational.append((status, (_indeterminate_fields if indeterminate else _known_fields)(r)))
        _check_status(status, informational=False)
        headers, content, trailers = _tail(r, indeterminate)
    except Truncated as exc:
        raise MalformedMessage(f"truncated binary HTTP response: {exc}") from None
    return Response(status, headers, content, trailers, informational)


@dataclass
class Head:
    """The final status and header section of a streamed response (informational ones are skipped)."""
    status: int
    headers: Fields

    def header(self, name: str) -> str | None:
        return _first(self.headers, name)


@dataclass
class Trailers:
    fields: Fields

    def get(self, name: str) -> str | None:
        return _first(self.fields, name)


class ResponseStreamDecoder:
    """Incremental parser of an indeterminate-length response: feed() bytes as they arrive, get events back:
    one Head, then content chunks (bytes), then one Trailers. finish() at end of stream refuses a response cut
    inside its content, which RFC 9292 does not allow (the content terminator proves the end was reached)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "framing"
        self._status = 0
        self._chunks = 0

    def feed(self, data: bytes) -> list[Head | bytes | Trailers]:
        self._buf += data
        events: list[Head | bytes | Trailers] = []
        while self._state != "padding":
            r = _Reader(self._buf)
            try:
                event = self._step(r)
            except Truncated:
                break
            del self._buf[:r.pos]
            if event is not None:
                events.append(event)
        if self._state == "padding":
            _check_padding(_Reader(self._buf))
            self._buf.clear()
        return events

    def _step(self, r: _Reader) -> Head | bytes | Trailers | None:
        if self._state == "framing":
            if r.varint() != INDETERMINATE_RESPONSE:
                raise MalformedMessage("streamed response is not an indeterminate-length binary HTTP response")
            self._state = "control"
        elif self._state == "control":
            status = r.varint()
            if 100 <= status <= 199:
                _indeterminate_fields(r)
                return None
            self._status, self._state = _check_status(status, False), "headers"
        elif self._state == "headers":
            headers = _indeterminate_fields(r)
            self._state = "content"
            return Head(self._status, headers)
        elif self._state == "content":
            size = r.varint()
            if size == 0:
                self._state = "trailers"
                return None
            self._chunks += 1
            return r.take(size)
        elif self._state == "trailers":
            trailers = _indeterminate_fields(r)
            self._state = "padding"
            return Trailers(trailers)
        return None

    def finish(self) -> list[Head | bytes | Trailers]:
        """Events implied by the end of the stream; MalformedMessage when the response was cut short."""
        if self._buf and self._state != "padding":
            raise MalformedMessage("streamed binary HTTP response ends inside a section")
        if self._state == "headers":
            return [Head(self._status, []), Trailers([])]
        if self._state == "content" and self._chunks == 0:
            return [Trailers([])]
        if self._state == "trailers":
            return [Trailers([])]
        if self._state in ("framing", "control", "content"):
            raise MalformedMessage("streamed binary HTTP response was truncated before its end")
        return []
