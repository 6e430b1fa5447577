"""Request ids that clients may send: bounded and plain, since they go into logs, spans and other services'
requests (a newline in one could forge a log line; a 100 kB one would bloat every record that names it)."""
from __future__ import annotations

import re

from hotslot.errors import InvalidArgument

MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]+")


def validate_request_id(request_id: str, field_name: str = "request_id") -> str:
    """Returns `request_id` if empty (one is generated) or at most 128 characters of [A-Za-z0-9._:-]; raises
    InvalidArgument otherwise, without echoing it."""
    if not request_id:
        return request_id
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument.field(
            field_name, f"is {len(request_id)} characters long; at most {MAX_REQUEST_ID_CHARS} are allowed"
        )
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidArgument.field(
            field_name, "may contain only letters, digits and . _ : - (no spaces, newlines or other characters)"
        )
    return request_id
