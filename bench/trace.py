"""A load generator that keeps every request's latency, for latency-over-time pictures.

    python bench/trace.py PORT PATH SECONDS CONNECTIONS OUT.json

wrk reports one distribution per run; a picture of a recycling run needs each
request's time. Each connection is a thread with a kept-alive socket (like wrk's
connections); OUT.json gets ``{"t0": ..., "requests": [[sent_at_s, latency_ms,
status], ...], "errors": [at_s, ...]}`` with times from ``time.monotonic()``
(the same clock as the servers' processes, so worker births and exits line up).
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from typing import List, Optional, Tuple

_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


def _one(sock: socket.socket, request: bytes, buf: bytes) -> Tuple[int, bool, bytes]:
    """Send one request, read its response: (status, server closes, bytes read past it)."""
    sock.sendall(request)
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    match = _LENGTH.search(head)
    length = int(match.group(1)) if match else 0
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    return int(head[9:12]), b"connection: close" in head.lower(), rest[length:]


def _connection(port: int, request: bytes, until: float, out: List[Tuple[float, float, int]],
                errors: List[float]) -> None:
    sock: Optional[socket.socket] = None
    buf = b""
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            status, close, buf = _one(sock, request, buf)
        except OSError:
            errors.append(t0)
            if sock is not None:
                sock.close()
            sock = None
            continue
        out.append((t0, (time.monotonic() - t0) * 1000.0, status))
        if close:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()


def main(argv: List[str]) -> int:
    port, path, seconds, connections, target = int(argv[0]), argv[1], float(argv[2]), int(argv[3]), argv[4]
    request = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode()
    t0 = time.monotonic()
    out: List[Tuple[float, float, int]] = []
    errors: List[float] = []
    threads = [threading.Thread(target=_connection, args=(port, request, t0 + seconds, out, errors))
               for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(target, "w") as f:
        json.dump({"t0": t0, "requests": out, "errors": errors}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
