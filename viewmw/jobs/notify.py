"""The failure notification: a callable named by a dotted path, or a webhook URL."""

from __future__ import annotations

import importlib
import json
import logging
import urllib.request
from typing import Any

logger = logging.getLogger("viewmw.jobs")

WEBHOOK_TIMEOUT_SECONDS = 10


def notify_failure(hook: str | None, details: dict[str, Any]) -> None:
    """Call ``hook`` with ``details``; a failing hook is logged, never raised."""
    if hook is None:
        return
    try:
        if hook.startswith(("http://", "https://")):
            _post_json(hook, details)
        else:
            module_name, _, function_name = hook.partition(":")
            getattr(importlib.import_module(module_name), function_name)(details)
    except Exception:
        logger.exception("the failure hook %s failed", hook)


def _post_json(url: str, details: dict[str, Any]) -> None:
    body = json.dumps(details, default=str).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
        response.read()
