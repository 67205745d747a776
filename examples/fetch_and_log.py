"""Start a background task from the request handler: fetch a URL and log the response.

The second example of Supabase's background-tasks guide (fetchAndLog), ported to
Flask. The URL is this server's own /json route, so it runs without network access:

    gunicorn -k edgesync.Worker -b 127.0.0.1:8000 --chdir examples fetch_and_log:app

    curl 127.0.0.1:8000/     # "Request accepted" at once; the fetch is logged just after
"""

from __future__ import annotations

import urllib.request

from flask import Flask, current_app, request

import edgesync
from edgesync.flask import EdgeSync

app = Flask(__name__)
app.logger.setLevel("INFO")  # outside debug mode Flask logs only warnings and errors
EdgeSync(app)


def fetch_and_log(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    current_app.logger.info("fetched %s: %d %s", url, response.status, body.decode())


@app.get("/")
def index():
    # Build the URL now: the task runs after the response, with no request to ask.
    url = request.host_url + "json"
    edgesync.wait_until(fetch_and_log, url)  # does not block the request
    return "Request accepted\n", 202


@app.get("/json")
def sample():
    # Stands in for https://httpbin.org/json, the guide's URL.
    return {"slideshow": {"title": "Sample Slide Show", "author": "Yours Truly"}}
