"""Binary HTTP (RFC 9292) against the RFC's examples, and the strictness that keeps malformed input out."""
import random

import pytest

from ccserve.router import bhttp, varint
from ccserve.router.errors import MalformedMessage, Truncated


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 9292 section 5.1, Figure 7 (known-length) and Figure 8 (indeterminate-length, 10 bytes of padding).
REQUEST_KNOWN = h("""00034745 54056874 74707300 0a2f6865 6c6c6f2e 74787440 6c0a7573 65722d61 67656e74 34637572
    6c2f372e 31362e33 206c6962 6375726c 2f372e31 362e3320 4f70656e 53534c2f 302e392e 376c207a 6c69622f 312e322e
    3304686f 73740f77 77772e65 78616d70 6c652e63 6f6d0f61 63636570 742d6c61 6e677561 67650665 6e2c206d 690000""")
REQUEST_INDETERMINATE = h("""02034745 54056874 74707300 0a2f6865 6c6c6f2e 7478740a 75736572 2d616765 6e743463
    75726c2f 372e3136 2e33206c 69626375 726c2f37 2e31362e 33204f70 656e5353 4c2f302e 392e376c 207a6c69 622f312e
    322e3304 686f7374 0f777777 2e657861 6d706c65 2e636f6d 0f616363 6570742d 6c616e67 75616765 06656e2c 206d6900
    00000000 00000000 00000000""")
HELLO = bhttp.Request("GET", "/hello.txt", "https", "", [
    ("user-agent", "curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"), ("host", "www.example.com"),
    ("accept-language", "en, mi")])

# RFC 9292 section 5.2, Figure 10: interim 102 and 103 responses, then 200 with content (indeterminate).
RESPONSE_INTERIM = h("""03406607 72756e6e 696e670a 22736c65 65702031 35220040 67046c69 6e6b233c 2f737479 6c652e63
    73733e3b 2072656c 3d707265 6c6f6164 3b206173 3d737479 6c65046c 696e6b24 3c2f7363 72697074 2e6a733e 3b207265
    6c3d7072 656c6f61 643b2061 733d7363 72697074 0040c804 64617465 1d4d6f6e 2c203237 204a756c 20323030 39203132
    3a32383a 35332047 4d540673 65727665 72064170 61636865 0d6c6173 742d6d6f 64696669 65641d57 65642c20 3232204a
    756c2032 30303920 31393a31 353a3536 20474d54 04657461 67142233 34616133 38372d64 2d313536 38656230 30220d61
    63636570 742d7261 6e676573 05627974 65730e63 6f6e7465 6e742d6c 656e6774 68023531 04766172 790f4163 63657074
    2d456e63 6f64696e 670c636f 6e74656e 742d7479 70650a74 6578742f 706c6169 6e003348 656c6c6f 20576f72 6c642120
    4d792063 6f6e7465 6e742069 6e636c75 64657320 61207472 61696c69 6e672043 524c462e 0d0a0000""")
# RFC 9292 section 5.2, Figure 12: a chunked response with a trailer, known-length.
CHUNKED_KNOWN = h("""0140c800 1d546869 7320636f 6e74656e 7420636f 6e746169 6e732043 524c462e 0d0a0d07 74726169
    6c657204 74657874""")
CHUNKED_RESPONSE = bhttp.Response(200, [], b"This content contains CRLF.\r\n", [("trailer", "text")])


def test_varint_rfc9000_examples():
    # RFC 9000 appendix A.1
    for encoded, value in (("c2197c5eff14e88c", 151288809941952652), ("9d7f3e7d", 494878333), ("7bbd", 15293),
                           ("25", 37), ("4025", 37)):
        assert varint.decode(h(encoded), 0) == (value, len(h(encoded)))
    for value in (0, 63, 64, 16383, 16384, 2**30 - 1, 2**30, 2**62 - 1):
        assert varint.decode(varint.encode(value), 0) == (value, len(varint.encode(value)))
    assert varint.encode(37) == b"\x25" and varint.encode(15293) == h("7bbd")
    with pytest.raises(Truncated):
        varint.decode(h("9d7f3e"), 0)
    with pytest.raises(ValueError):
        varint.encode(2**62)


def test_request_known_length_matches_rfc():
    assert bhttp.encode_request(HELLO) == REQUEST_KNOWN
    assert bhttp.decode_request(REQUEST_KNOWN) == HELLO


def test_request_indeterminate_with_padding_matches_rfc():
    assert bhttp.decode_request(REQUEST_INDETERMINATE) == HELLO
    assert bhttp.encode_request(HELLO, indeterminate=True, padding=10) == REQUEST_INDETERMINATE


def test_truncated_request_means_empty_parts():
    # RFC 9292 section 5.1: the last two bytes (empty content and trailers) can be removed.
    assert bhttp.decode_request(REQUEST_KNOWN[:-2]) == HELLO
    tiny = h("00034745540568747470730b6578616d706c652e636f6d012f")     # RFC 9458 appendix A's request
    assert bhttp.decode_request(tiny) == bhttp.Request("GET", "/", "https", "example.com")


def test_response_with_interim_responses_matches_rfc():
    resp = bhttp.decode_response(RESPONSE_INTERIM)
    assert [s for s, _ in resp.informational] == [102, 103]
    assert resp.informational[1][1] == [("link", "</style.css>; rel=preload; as=style"),
                                        ("link", "</script.js>; rel=preload; as=script")]
    assert resp.status == 200 and resp.header("content-type") == "text/plain"
    assert resp.content == b"Hello World! My content includes a trailing CRLF.\r\n"
    assert bhttp.encode_response(resp, indeterminate=True) == RESPONSE_INTERIM


def test_chunked_response_known_and_indeterminate():
    assert bhttp.encode_response(CHUNKED_RESPONSE) == CHUNKED_KNOWN
    assert bhttp.decode_response(CHUNKED_KNOWN) == CHUNKED_RESPONSE
    indeterminate = bhttp.encode_response(CHUNKED_RESPONSE, indeterminate=True)
    # the same message as the ohttp project's bhttp test (indeterminate form of RFC 9292 Figure 12)
    assert indeterminate == h("0340c8001d5468697320636f6e7465 6e7420636f6e7461696e732043524c462e0d0a00077472"
                              "61696c657204746578 7400")
    assert bhttp.decode_response(indeterminate) == CHUNKED_RESPONSE
    assert bhttp.decode_response(h("0140c8")) == bhttp.Response(200)


@pytest.mark.parametrize("bad, why", [
    (REQUEST_KNOWN + b"\x00\x01", "padding"),
    (b"\x04" + REQUEST_KNOWN[1:], "framing"),
    (REQUEST_KNOWN[:40], "truncated inside a section"),
    (bhttp.encode_request(bhttp.Request("GET", "/"))[:-3] + b"\x0c\x07:method\x03GET\x00\x00", "pseudo-field"),
])
def test_malformed_requests_are_refused(bad, why):
    with pytest.raises(MalformedMessage):
        bhttp.decode_request(bad)


def test_field_rules():
    with pytest.raises(MalformedMessage):
        bhttp.encode_request(bhttp.Request("GET", "/", headers=[("x-a", "line\r\nbreak")]))
    with pytest.raises(MalformedMessage):
        bhttp.encode_request(bhttp.Request("GET", "/", headers=[("bad name", "v")]))
    with pytest.raises(MalformedMessage):
        bhttp.decode_response(CHUNKED_KNOWN[:1] + varint.encode(99) + CHUNKED_KNOWN[3:])   # status 99
    with pytest.raises(MalformedMessage):
        bhttp.decode_request(CHUNKED_KNOWN)                                             # a response


def _stream(parts: list[bytes]) -> list:
    decoder, events = bhttp.ResponseStreamDecoder(), []
    for part in parts:
        events += decoder.feed(part)
    return events + decoder.finish()


def test_stream_decoder_across_any_split():
    encoded = (bhttp.stream_head(200, [("content-type", "text/event-stream")]) + bhttp.stream_chunk(b"data: 1\n\n")
               + bhttp.stream_chunk(b"") + bhttp.stream_chunk(b"data: 2\n\n") + bhttp.stream_end([("x-done", "1")]))
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(encoded)), rng.randint(0, 8)))
        parts = [encoded[a:b] for a, b in zip([0] + cuts, cuts + [len(encoded)])]
        events = _stream(parts)
        assert isinstance(events[0], bhttp.Head) and events[0].header("content-type") == "text/event-stream"
        assert b"".join(e for e in events if isinstance(e, bytes)) == b"data: 1\n\ndata: 2\n\n"
        assert isinstance(events[-1], bhttp.Trailers) and events[-1].get("x-done") == "1"
    # the RFC's interim example streams too: interim responses are skipped, content arrives
    events = _stream([RESPONSE_INTERIM])
    assert events[0].status == 200 and events[1].startswith(b"Hello World!")


def test_stream_decoder_refuses_a_cut_inside_content():
    encoded = bhttp.stream_head(200, []) + bhttp.stream_chunk(b"partial")
    with pytest.raises(MalformedMessage):
        _stream([encoded])
    # a response cut after its header section (content never started) is valid RFC 9292 truncation
    assert [type(e) for e in _stream([bhttp.stream_head(204, [])])] == [bhttp.Head, bhttp.Trailers]


def test_client_padding_hides_length_up_to_a_size_class():
    from ccserve.router.oblivious import padded
    sizes = {len(padded(bhttp.Request("POST", "/v1/x", content=b"a" * n))) for n in (0, 10, 500, 900)}
    assert sizes == {1024}
    big = padded(bhttp.Request("POST", "/v1/x", content=b"a" * 5000))
    assert len(big) == 8192 and bhttp.decode_request(big).content == b"a" * 5000
