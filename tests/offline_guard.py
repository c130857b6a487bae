"""A socket guard for the tests: refuse every network connection that leaves this machine.

The kit must run in a classroom with no internet (or a slow one), so its tests run with the
network blocked by construction, not by hope. ``block_network()`` patches Python's socket
layer (``socket.socket.connect``/``connect_ex``/``sendto``, ``socket.create_connection``,
``socket.getaddrinfo``/``gethostbyname``/``gethostbyname_ex``) so that any attempt to reach
an address outside loopback raises ``NetworkBlockedError`` at once, with the address in the
message. Loopback (127.0.0.0/8, ::1, ``localhost``) and Unix sockets stay allowed: Jupyter
kernels, JupyterLab and the browser test talk over them.

``NetworkBlockedError`` is a ``ConnectionError`` (an ``OSError``), the same family of error a
machine without a network gives, so libraries that handle "offline" (huggingface_hub,
urllib3) behave as they would in a classroom without Wi-Fi. Every refused attempt is also
recorded (``blocked_attempts()``, and appended to the file named by ``SDKIT_NETWORK_LOG``
when that variable is set) so a test run can show what tried to go out.

Test-only code (no notebook uses it): tests/conftest.py imports it as ``offline_guard``, and
the IPython startup file conftest writes for the test kernels imports it from tests/ by
absolute path.

Left out: connections made by C libraries that bypass Python's socket module (libzmq, curl,
a browser); the browser test restricts Chromium with its own flags.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from contextlib import contextmanager

LOG_ENV = "SDKIT_NETWORK_LOG"
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}

_originals: dict[str, object] = {}
_attempts: list[str] = []


class NetworkBlockedError(ConnectionError):
    """Raised for a connection to a non-loopback address while the guard is on."""


def _is_local_host(host) -> bool:
    """True for loopback/unspecified IP literals, localhost names and 'no host' (bind)."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("idna", errors="replace")
    if not isinstance(host, str):
        return False
    name = host.strip().strip("[]").lower()
    if name == "":
        return True  # bind to every interface / connect to this machine
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        return True
    name = name.split("%", 1)[0]  # IPv6 zone id, e.g. fe80::1%eth0
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _refuse(what: str, target) -> None:
    message = (
        f"network access blocked by tests/offline_guard.py: {what} {target!r} is outside loopback "
        "(the kit and its tests must run without internet; allowed: 127.0.0.0/8, ::1, "
        "localhost, Unix sockets)"
    )
    _attempts.append(f"{what} {target!r}")
    path = os.environ.get(LOG_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"pid {os.getpid()}: {what} {target!r}\n")
        except OSError:
            pass
    raise NetworkBlockedError(message)


def _check_address(sock_family, address, what: str) -> None:
    if sock_family not in (socket.AF_INET, socket.AF_INET6):
        return  # Unix, netlink, ...: not the internet
    if isinstance(address, tuple) and address:
        if not _is_local_host(address[0]):
            _refuse(what, address)
    elif not _is_local_host(address):
        _refuse(what, address)


def _guarded_connect(self, address):
    _check_address(self.family, address, "connect to")
    return _originals["connect"](self, address)


def _guarded_connect_ex(self, address):
    _check_address(self.family, address, "connect to")
    return _originals["connect_ex"](self, address)


def _guarded_sendto(self, data, *args):
    address = args[-1]
    _check_address(self.family, address, "send to")
    return _originals["sendto"](self, data, *args)


def _guarded_create_connection(address, *args, **kwargs):
    if not _is_local_host(address[0]):
        _refuse("connect to", address)
    return _originals["create_connection"](address, *args, **kwargs)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_local_host(host):
        _refuse("look up", host)
    return _originals["getaddrinfo"](host, *args, **kwargs)


def _guarded_gethostbyname(host):
    if not _is_local_host(host):
        _refuse("look up", host)
    return _originals["gethostbyname"](host)


def _guarded_gethostbyname_ex(host):
    if not _is_local_host(host):
        _refuse("look up", host)
    return _originals["gethostbyname_ex"](host)


_PATCHES = {
    # name: (owner, attribute, replacement)
    "connect": (socket.socket, "connect", _guarded_connect),
    "connect_ex": (socket.socket, "connect_ex", _guarded_connect_ex),
    "sendto": (socket.socket, "sendto", _guarded_sendto),
    "create_connection": (socket, "create_connection", _guarded_create_connection),
    "getaddrinfo": (socket, "getaddrinfo", _guarded_getaddrinfo),
    "gethostbyname": (socket, "gethostbyname", _guarded_gethostbyname),
    "gethostbyname_ex": (socket, "gethostbyname_ex", _guarded_gethostbyname_ex),
}


def is_blocked() -> bool:
    """True while ``block_network()`` is in effect in this process."""
    return bool(_originals)


def block_network() -> None:
    """Refuse every connection outside loopback in this process (idempotent)."""
    if _originals:
        return
    for name, (owner, attr, replacement) in _PATCHES.items():
        _originals[name] = getattr(owner, attr)
        setattr(owner, attr, replacement)


def allow_network() -> None:
    """Undo ``block_network()`` (idempotent)."""
    for name, (owner, attr, _) in _PATCHES.items():
        if name in _originals:
            setattr(owner, attr, _originals.pop(name))


@contextmanager
def network_blocked():
    """``with network_blocked(): ...`` blocks inside the block and restores the state after."""
    was_blocked = is_blocked()
    block_network()
    try:
        yield
    finally:
        if not was_blocked:
            allow_network()


def blocked_attempts() -> list[str]:
    """The connections this process tried and the guard refused, oldest first."""
    return list(_attempts)
