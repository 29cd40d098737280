"""Logging to stderr, as plain text or one JSON object per line.

Every line is one line: in text lines, control characters in the message (a user name with a CR or LF, an
upstream's text) are escaped, so nothing a client or an upstream sends can forge or split a log line. An
exception is logged as one summary (its type, its message and where it was raised), never as a traceback,
at every level: no traceback reaches a terminal.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from types import TracebackType
from typing import Final

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _escape_control(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def exception_summary(exc_info: ExcInfo) -> str:
    """``TypeName: message (at file.py:123 in function)``, one line, escaped."""
    kind, value, tb = exc_info
    where = ""
    frames = traceback.extract_tb(tb) if tb is not None else []
    if frames:
        last = frames[-1]
        where = f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"
    return _escape_control(f"{kind.__name__}: {value}{where}")


def _exc_info(record: logging.LogRecord) -> ExcInfo | None:
    info = record.exc_info
    if not info or info[0] is None or info[1] is None:
        return None
    return info[0], info[1], info[2]


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = _escape_control(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        info = _exc_info(record)
        if info is not None:
            line += " exc=" + exception_summary(info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        info = _exc_info(record)
        if info is not None:
            out["exc"] = exception_summary(info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
