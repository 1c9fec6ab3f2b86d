"""How edgekit's commands log: one line per record on stderr, or JSON lines with ``--log-json``.

Shared by the workstation (``edgekit``) and the device (``edgekit-agent``) commands; library
code only calls ``logging.getLogger(__name__)`` and never configures logging itself.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["LOG_LEVELS", "setup_logging"]

LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str, log_json: bool) -> None:
    """Send every record at ``level`` or above to stderr, as text or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("device", "bundle", "seq", "fleet"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        return json.dumps(doc)
