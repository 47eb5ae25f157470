"""Visor's own log lines (never the node binaries'): plain text on a terminal, or JSON lines.

The JSON form has one object per line with ts, level, logger, msg (journald and Loki friendly).
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"   # name: visor, or the worker


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Configures the root logger once; called again (a reload) it only changes the level or format."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_visor", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._visor = True
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.setLevel(level)
