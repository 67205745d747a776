"""Render exported spans as a small timeline PNG: a request span and the task span linked to it.

    python bench/otel_timeline.py SPANS.jsonl OUT.png

``SPANS.jsonl`` holds one span per line in the shape the test app's exporter writes
(``tests/apps/otel.py``: name, trace_id, span_id, parent, start, end in ns, links,
events). The picture in docs/observability.md was made from a real gunicorn:

    SPANS_FILE=/tmp/spans.jsonl EDGESYNC_WALL_CLOCK_LIMIT_MS=0 \\
      .venv/bin/gunicorn -k edgesync.Worker -b 127.0.0.1:8000 tests.apps.otel:app
    curl 'http://127.0.0.1:8000/bg?id=demo&sleep=0.25'; kill -TERM <master pid>

One row per span, grouped by trace; each link drawn as an arrow from the span it
points to. The docs' picture leaves out the long ``edgesync.worker`` span
(``grep -v '"edgesync.worker"'`` on the file first).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, out: str) -> None:
    spans: List[Dict[str, Any]] = [json.loads(line) for line in open(src) if line.strip()]
    by_id = {s["span_id"]: s for s in spans}
    # Rows: each trace in order of its first span, parents before children.
    traces: Dict[str, List[Dict[str, Any]]] = {}
    for s in sorted(spans, key=lambda s: s["start"]):
        traces.setdefault(s["trace_id"], []).append(s)
    rows = [s for trace in traces.values() for s in trace]
    t0 = min(s["start"] for s in spans)
    t1 = max(s["end"] for s in spans)
    shortest = (t1 - t0) / 1e6 / 150  # a span shorter than this is drawn this wide, to be seen
    colours = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    fig, ax = plt.subplots(figsize=(7.5, 0.7 * len(rows) + 1.1), dpi=100)
    for i, s in enumerate(rows):
        y = len(rows) - 1 - i
        start, end = (s["start"] - t0) / 1e6, (s["end"] - t0) / 1e6
        colour = colours[list(traces).index(s["trace_id"]) % len(colours)]
        ax.barh(y, max(end - start, shortest), left=start, height=0.5, color=colour)
        depth = 0
        parent = s["parent"]
        while parent in by_id:
            depth, parent = depth + 1, by_id[parent]["parent"]
        label = "%s%s  %.1f ms  (trace %s…)" % ("  " * depth, s["name"], end - start, s["trace_id"][:6])
        late = start > 0.6 * (t1 - t0) / 1e6
        ax.text(end if late else start, y + 0.3, label, fontsize=8, va="bottom", ha="right" if late else "left")
        for link in s["links"]:
            target = by_id.get(link["span_id"])
            if target is not None:
                ty = len(rows) - 1 - rows.index(target)
                ax.annotate("", xy=(start, y + 0.25), xytext=((target["end"] - t0) / 1e6, ty - 0.25),
                            arrowprops={"arrowstyle": "->", "color": "0.3", "linestyle": "--"})
                ax.text(start + 3 * shortest, (y + ty) / 2, "link (%s): not a child" % link["attributes"].get(
                    "edgesync.link", ""), fontsize=7, color="0.3", va="center")
    ax.set_yticks([])
    ax.set_xlabel("ms")
    ax.set_ylim(-0.6, len(rows) - 0.1)
    ax.set_xlim(-shortest, (t1 - t0) / 1e6 * 1.02)
    ax.set_title("A request span and its task span (edgesync.otel)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
