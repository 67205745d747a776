"""What gunicorn gives a request beyond WSGI, for answering it from another thread (``_wsgi``).

design: a request whose thread is blocked past its limit is answered from the monitor's
thread. That needs the client's connection, which WSGI does not give: gunicorn puts the
socket in the environ for HTTP/1.x (``gunicorn.socket``) and, for HTTP/2, the response
object whose bound ``start_response`` the app got carries the connection and its stream.
Nothing here imports gunicorn.
"""

from __future__ import annotations

from typing import Any, List, Tuple


def http2(environ: Any) -> bool:
    """Whether gunicorn serves this request over HTTP/2 (gthread's ``handle_http2_request``)."""
    return bool(environ.get("HTTP_VERSION") == "2")


def client_socket(environ: Any) -> Any:
    """The HTTP/1.x client's socket, or None (gunicorn's ``default_environ``)."""
    return environ.get("gunicorn.socket")


def send_http2_response(start_response: Any, status: int, headers: List[Tuple[str, str]], body: bytes) -> bool:
    """Send a whole response on the HTTP/2 stream of ``start_response``; False if it has none.

    ``headers`` as HTTP/2 wants them (lower-case names). Raises what gunicorn's
    ``HTTP2ServerConnection.send_response`` raises when the stream or connection is gone.
    """
    resp = getattr(start_response, "__self__", None)
    h2 = getattr(resp, "h2_conn", None)
    if resp is None or h2 is None:
        return False
    h2.send_response(resp.stream_id, status, headers, body)
    return True
