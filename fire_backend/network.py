"""Addresses: which hosts are this machine's loopback (load tests, plaintext binds and the automatic
inference key are allowed there only)."""

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
