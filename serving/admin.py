"""Calls to the server's restricted APIs (model control), with the admin key.

The key travels in one header (``fire_backend.names.ADMIN_HEADER``) and is found in one way
(``fire_backend.keys.ADMIN.read()``): ``$FIRE_ADMIN_KEY``, else the file ``fire serve`` wrote (mode 0600)."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request

from fire_backend.errors import FireError
from fire_backend.names import ADMIN_HEADER


class ControlError(FireError):
    """A model-control call failed; the message carries the server's reason."""


def http_request(http_url: str, path: str, method: str = "GET", headers: dict | None = None,
                 timeout: float = 120.0, body: dict | None = None) -> tuple[int, bytes]:  # fmt: skip
    """(status, body) of one call to the server's HTTP API."""
    req = urllib.request.Request(
        f"http://{http_url}{path}",
        method=method,
        data=json.dumps(body or {}).encode() if method == "POST" else None,
        headers=headers or {},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def admin_request(
    http_url: str, admin_key: str, path: str, method: str = "POST", timeout: float = 120.0, body: dict | None = None
) -> tuple[int, bytes]:
    """(status, body) of one call to the server's HTTP API carrying the admin key."""
    return http_request(http_url, path, method, {ADMIN_HEADER: admin_key}, timeout, body)


def _control(http_url: str, admin_key: str, model: str, action: str, timeout: float, body: dict | None = None) -> None:
    path = f"/v2/repository/models/{model}/{action}"
    status, body = admin_request(http_url, admin_key, path, timeout=timeout, body=body)
    if status != 200:
        text = body.decode(errors="replace")
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            text = json.loads(text).get("error", text)
        raise ControlError(f"{action}ing {model} failed (HTTP {status}): {text}")


def load_model(http_url: str, admin_key: str, model: str, timeout: float = 120.0) -> None:
    """(Re)load ``model``; Triton keeps the old version serving until the new one is ready, and keeps it
    when the new one fails to load."""
    _control(http_url, admin_key, model, "load", timeout)


def unload_model(http_url: str, admin_key: str, model: str, timeout: float = 120.0, dependents: bool = False) -> None:
    """Unload ``model`` (and, with ``dependents``, the models an ensemble was built from)."""
    _control(http_url, admin_key, model, "unload", timeout, {"parameters": {"unload_dependents": dependents}})
