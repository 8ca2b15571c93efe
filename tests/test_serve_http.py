"""`edgert serve` below the API: malformed HTTP, headers past the limit and refused CORS preflights
are answered in OpenAI's error shape too (a real server process, raw sockets), and the server goes on."""
from __future__ import annotations

import socket
import time

import pytest

from test_serve import Server, art, error_of  # noqa: F401 (art: the fixture's artifact, per module)

httpx = pytest.importorskip("httpx")

ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def server(art):
    s = Server(art, "--cors-origin", ORIGIN)
    yield s
    s.stop()
    assert "Traceback" not in s.output(), s.output()[-3000:]


def exchange(server, *parts: bytes) -> tuple[str, dict, bytes]:
    """Send raw bytes (parts 0.1 s apart), read until the server closes (a reset fails): (status line, headers, body).
    A small send buffer keeps a long request in flight while the server answers, as over a network."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
        s.settimeout(5)
        s.connect(("127.0.0.1", server.port))
        for i, part in enumerate(parts):
            time.sleep(0.1 if i else 0)
            s.sendall(part)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
            assert len(raw) < 1 << 20
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return status, headers, body


def openai_error(status: int, headers: dict, body: bytes) -> dict:
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:200])
    assert int(headers["content-length"]) == len(body)
    return error_of(httpx.Response(status, content=body))


def still_serving(server):
    assert httpx.get(server.url + "/health", timeout=5).json()["status"] == "ok"
    assert server.proc.poll() is None


def invalid_count(server, status: int) -> int:
    """/metrics' count of malformed requests answered with `status`."""
    key = f'edgert_requests_total{{endpoint="invalid",status="{status}"}} '
    return sum(int(line[len(key):]) for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines()
               if line.startswith(key))


def test_malformed_http_gets_a_400_in_openai_shape(server):
    counted = invalid_count(server, 400)
    for request in (b"\x00\xff GARBAGE\r\n\r\n",                                        # no request line
                    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"zz\r\n{}\r\n0\r\n\r\n",                                          # a bad chunk size
                    b"GET /v1/models HTTP/1.1\r\nHost: evil.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"zz\r\n{}\r\n0\r\n\r\n",                    # ... to a request answered (403) without its body
                    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n",   # an invalid header
                    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n"):
        status, headers, body = exchange(server, request)
        assert status.startswith("HTTP/1.1 400 "), (request, status)
        assert headers.get("connection") == "close"
        e = openai_error(400, headers, body)
        assert e["type"] == "invalid_request_error" and e["code"] == "invalid_http", e
        still_serving(server)
    assert "Traceback" not in server.output() and "internal error" not in server.output(), server.output()[-3000:]
    assert invalid_count(server, 400) == counted + 5                   # counted in /metrics, not a log line each
    assert "Invalid HTTP" not in server.output(), server.output()[-3000:]


def test_headers_past_the_limit_get_a_431_then_a_clean_close(server):
    counted = invalid_count(server, 431)
    big = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    for parts in ([big], [big[:100_000], big[100_000:150_000], big[150_000:]]):    # in one go; in pieces, as
        status, headers, body = exchange(server, *parts)        # over a network; read to the end: no reset
        assert status.startswith("HTTP/1.1 431 "), status
        e = openai_error(431, headers, body)
        assert e["code"] == "headers_too_large" and "64 KiB" in e["message"], e
    # a client library sending it in one go sees the answer as well
    r = httpx.get(server.url + "/health", headers={"X-Big": "a" * 200_000}, timeout=5)
    assert r.status_code == 431 and error_of(r)["code"] == "headers_too_large"
    still_serving(server)
    assert invalid_count(server, 431) == counted + 3


def test_refused_cors_preflights_are_400s_in_openai_shape(server):
    url = server.url + "/v1/chat/completions"
    r = httpx.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}, timeout=5)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    e = error_of(r)
    assert e["code"] == "cors_not_allowed" and "origin" in e["message"], e
    assert "access-control-allow-origin" not in r.headers
    # a method the server does not allow, from the allowed origin: the page may read why
    r = httpx.options(url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"}, timeout=5)
    assert r.status_code == 400 and error_of(r)["code"] == "cors_not_allowed" and "method" in error_of(r)["message"]
    assert r.headers["access-control-allow-origin"] == ORIGIN
    # an allowed preflight is as before
    r = httpx.options(url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}, timeout=5)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN and "error" not in r.text
    assert "POST" in r.headers["access-control-allow-methods"]
    still_serving(server)
