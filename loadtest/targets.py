"""Which hosts a load test may target: loopback only unless the operator says otherwise.

Kept apart from the locustfiles' shared module, which imports locust (and so monkey-patches the process
with gevent): the runner and the tests import this without that side effect."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlparse


def host_of(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"scheme://{url}")
    return parsed.hostname or ""


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False
