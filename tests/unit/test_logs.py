"""visor.logs: the JSON line format and the one root handler that text and JSON share."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import warnings

import pytest

from visor.logs import JsonFormatter, setup_logging


def record(msg="%s upgraded", *args, level=logging.INFO, exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.getLogger("visor").makeRecord("visor", level, __file__, 1, msg, args or ("node",), exc_info,
                                                extra=extra or None)
    rec.created = 1700000000.25
    return rec


def test_a_record_is_one_json_object_with_the_fields_shippers_need():
    line = JsonFormatter().format(record(level=logging.WARNING))
    assert "\n" not in line
    assert json.loads(line) == {"ts": 1700000000.25, "time": "2023-11-14T22:13:20.250Z", "level": "warning",
                                "logger": "visor", "pid": os.getpid(), "msg": "node upgraded"}


def test_a_traceback_stays_on_the_one_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record("%s failed\nbadly", level=logging.ERROR, exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == "node failed\nbadly" and "RuntimeError: boom" in parsed["exc"]


def test_extra_fields_are_kept_and_odd_values_become_text():
    parsed = json.loads(JsonFormatter().format(record(event="binary.exited", fields={"exitcode": -9},
                                                      where=object())))
    assert parsed["event"] == "binary.exited" and parsed["fields"] == {"exitcode": -9}
    assert parsed["where"].startswith("<object object")
    assert parsed["msg"] == "node upgraded"  # an extra never replaces the standard keys


def test_non_ascii_text_survives_as_escaped_json():
    parsed = json.loads(JsonFormatter().format(record("%s", "héllo ✓")))
    assert parsed["msg"] == "héllo ✓"


@pytest.fixture
def root_logging():
    """setup_logging changes the root logger: put it back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_setup_twice_keeps_one_handler_and_switches_format_and_level(root_logging):
    out = io.StringIO()
    first = setup_logging("text", "INFO", stream=out)
    logging.getLogger("visor").info("plain")
    second = setup_logging("json", "WARNING", stream=out)
    logging.getLogger("visor").info("hidden")
    logging.getLogger("fetcher").warning("as json")
    assert first is second
    assert [h for h in logging.getLogger().handlers if getattr(h, "_visor", False)] == [first]
    text, js = out.getvalue().splitlines()
    assert text.endswith("visor INFO plain")
    assert json.loads(js)["logger"] == "fetcher" and json.loads(js)["level"] == "warning"


def test_python_warnings_become_log_lines(root_logging):
    out = io.StringIO()
    setup_logging("json", "INFO", stream=out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning)
    parsed = json.loads(out.getvalue())
    assert parsed["logger"] == "py.warnings" and "deprecated thing" in parsed["msg"]
