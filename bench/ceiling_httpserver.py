"""Throughput ceiling: the fastest stdlib ``http.server`` setup we know, doing no work.

A ``ThreadingHTTPServer`` whose handler answers a fixed small JSON document on
``GET``/``POST /score`` and ``Healthy`` on ``GET /``. It is tuned the obvious ways:
HTTP/1.1 keep-alive, TCP_NODELAY, status line + headers + body in one write,
no per-request logging, a listen backlog that fits 64 connections. It still
uses ``BaseHTTPRequestHandler``'s request parsing (``http.client.parse_headers``),
so it is the floor cost of "a server built on http.server", not of Python.

    python bench/ceiling_httpserver.py --port 8001
"""

import argparse
import http.server
import socketserver

_SCORE = b'{"message": "Hello, World!"}'
_HEALTH = b"Healthy"


def _response(body, content_type, close):
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode("latin-1") + body


# Prebuilt answers: (path is /score?, close?) -> bytes.
_ANSWERS = {
    (True, False): _response(_SCORE, "application/json", False),
    (True, True): _response(_SCORE, "application/json", True),
    (False, False): _response(_HEALTH, "text/plain; charset=utf-8", False),
    (False, True): _response(_HEALTH, "text/plain; charset=utf-8", True),
}
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n" \
    b'{"message": "no such path"}'


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says close
    disable_nagle_algorithm = True  # TCP_NODELAY, set by StreamRequestHandler.setup()

    def log_message(self, format, *args):  # no access log
        pass

    def _answer(self):
        path = self.path.split("?", 1)[0]
        if path == "/score" or (path == "/" and self.command == "GET"):
            self.wfile.write(_ANSWERS[(path == "/score", self.close_connection)])
        else:
            self.wfile.write(_NOT_FOUND)

    def do_GET(self):
        self._answer()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._answer()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        pass  # wrk resets its connections when a run ends; that is not news


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    with Server((args.host, args.port), Handler) as server:
        print(f"ceiling_httpserver listening on {args.host}:{args.port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
