"""Logging setup every service shares: one line per record on stderr, as readable text or as JSON that carries the
service name and the trace and span of the current OpenTelemetry span, so logs and traces can be joined. User text
cannot forge lines (control characters are escaped in text logs; JSON escapes them itself), and prompts stay out
(the pipelines' truncation warning, which quotes the cut-off part of the prompt, is reworded)."""
from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

# Marks the handler this module installed so a second call replaces it instead of adding another.
_HANDLER_MARK = "_hotslot_handler"


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _RECORD_ATTRS and not key.startswith("_")}


def _trace_fields() -> dict[str, str]:
    # A valid context is enough (not only a recording span): a span dropped by the sampler still carries the
    # trace id the caller's logs have, and joining on it is the point.
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, service, trace_id/span_id, then the `extra=` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
        }
        entry.update(_trace_fields())
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot encode (a Path, an enum) must not lose the whole record.
        return json.dumps(entry, default=str, ensure_ascii=False)


# C0 and C1 control characters, DEL and the Unicode line and paragraph separators: anything a terminal or a log
# shipper could take for the end of a line (or for a colour).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_text(text: str) -> str:
    """`text` with every control character written as an escape (\\n, \\x1b, \\u2028), so one record stays
    one line whatever a client put in its request."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), m.group().encode("unicode_escape").decode("ascii")), text)


class TextFormatter(logging.Formatter):
    """`ts LEVEL logger [service] message key=value ...`; a traceback, when there is one, follows on its own lines."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        fields = {**_extras(record), **_trace_fields()}
        message = escape_text(record.getMessage())
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name} [{self.service}] {message}"
        if fields:
            line += " " + " ".join(f"{key}={escape_text(str(value))}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


# diffusers' text-encoding step warns "The following part of your input was truncated because CLIP can only handle
# sequences up to N tokens: [<the rest of the prompt>]": the prompt, in the log.
_TRUNCATED_PROMPT = re.compile(r"part of your input was truncated .*?up to\s*(\d+) tokens", re.DOTALL)


class PromptFilter(logging.Filter):
    """Rewords the pipelines' prompt-truncation warning so it keeps the fact (and the token limit) but not the
    prompt text. A handler filter: it sees records that propagate from any logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and isinstance(record.msg, str) and "truncated" in record.msg:
            try:
                text = record.getMessage()
            except Exception:
                return True
            match = _TRUNCATED_PROMPT.search(text)
            if match:
                record.msg = (f"a prompt was longer than the text encoder's {match.group(1)} tokens and was "
                              "truncated (the cut-off text is not logged)")
                record.args = None
        return True


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is at emit time, so a redirect made later (pytest's capture, a launcher
    swapping streams) is followed instead of writing to a stream that may be closed by then."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(service: str, level: str = "INFO", fmt: str = "text") -> None:
    """Sends the root logger to stderr in format `fmt` ("text" or "json") at `level`. Calling it again replaces
    the handler it installed, so it is safe to call from both a CLI and run_server."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(PromptFilter())
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
