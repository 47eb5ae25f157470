"""Visor's own log lines (never the node binaries'): plain text on a terminal, or JSON lines.

Owns the formatters and the one handler on the root logger. The broker and every worker it forks
inherit that handler and share one stderr, so each record is written and flushed as a whole line;
the JSON form escapes newlines (a traceback included), so a log shipper never sees half a record.
It must not touch the node binaries' output, which goes straight to the same stderr, unparsed.

The JSON form has one object per line: ts (Unix seconds), time (UTC, ISO 8601), level, logger, pid,
msg; exc when an exception is attached; and any `extra={...}` fields a caller passed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"   # name: visor, or the worker

# Attributes every LogRecord has; anything else on a record came from `extra=` and is the caller's.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_FIRST = ("ts", "time", "level", "logger", "pid", "msg")         # a caller's extra never replaces these


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.created * 1000)              # ts and time name the same millisecond
        line = {"ts": ms / 1000, "time": _iso(ms), "level": record.levelname.lower(), "logger": record.name,
                "pid": record.process, "msg": record.getMessage().rstrip("\n")}
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _FIRST and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd value in `extra` must cost its exactness, never the line
        return json.dumps(line, separators=(",", ":"), default=str)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def make_formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def setup_logging(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Configures the root logger once; called again (a reload) it only changes the format and level.

    Python warnings go through it too (captureWarnings), so that in JSON mode nothing Visor itself
    writes to stderr is a bare line. Returns the handler (tests read what it wrote).
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_visor", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
        handler._visor = True
        root.addHandler(handler)
    elif stream is not None:
        handler.setStream(stream)
    handler.setFormatter(make_formatter(fmt))
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler
