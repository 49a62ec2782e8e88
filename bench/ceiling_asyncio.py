"""Throughput ceiling: a minimal single-threaded asyncio ``Protocol`` HTTP/1.1 server.

It answers a fixed small JSON document on ``GET``/``POST /score`` and ``Healthy``
on ``GET /``. Parsing is the least that is still correct for well-formed
clients: the request line, ``Content-Length`` and ``Connection`` headers,
keep-alive and pipelining. No chunked request bodies, no limits, no logging.
It shows what one Python thread with an event loop can push through the
kernel; asyncio already sets TCP_NODELAY on its sockets.

    python bench/ceiling_asyncio.py --port 8002
"""

import argparse
import asyncio

_SCORE = b'{"message": "Hello, World!"}'
_HEALTH = b"Healthy"


def _response(status, body, content_type, close):
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode("latin-1") + body


_ANSWERS = {}
for _close in (False, True):
    _ANSWERS[("/score", _close)] = _response("200 OK", _SCORE, "application/json", _close)
    _ANSWERS[("/", _close)] = _response("200 OK", _HEALTH, "text/plain; charset=utf-8", _close)
    _ANSWERS[(None, _close)] = _response("404 Not Found", b'{"message": "no such path"}',
                                         "application/json", _close)


class HttpProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self.transport.close()
                return
            method, target, version = parts
            length = 0
            close = version == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection":
                    value = value.strip().lower()
                    close = value == "close" or (version == "HTTP/1.0" and value != "keep-alive")
            total = end + 4 + length
            if len(self.buffer) < total:
                return  # wait for the rest of the body
            self.buffer = self.buffer[total:]
            path = target.split("?", 1)[0]
            if path == "/" and method != "GET":
                path = None
            self.transport.write(_ANSWERS.get((path, close)) or _ANSWERS[(None, close)])
            if close:
                self.transport.close()
                return


async def _serve(host, port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProtocol, host, port, backlog=1024, reuse_address=True)
    print(f"ceiling_asyncio listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
