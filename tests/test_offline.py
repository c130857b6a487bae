"""Offline by construction: the socket guard refuses the internet, here and in notebook kernels.

No test sends real traffic outside loopback: where a test proves that a connection to a
public address is refused, the guard's pass-through to the real socket call is replaced by a
tripwire first, so even a broken guard would fail the test instead of reaching the network.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import offline_guard as offline  # tests/offline_guard.py (conftest puts tests/ on sys.path)
import pytest
from nbclient import NotebookClient
from offline_guard import NetworkBlockedError

PUBLIC = ("93.184.216.34", 80)  # example.com's old address; never contacted
ROOT = Path(__file__).resolve().parents[1]


def _tripwire(*args, **kwargs):
    raise AssertionError(f"the guard let a public connection through: {args!r}")


@pytest.fixture
def tripwired(monkeypatch):
    """Make the guard's pass-through for public addresses fail the test, not hit the network."""
    assert offline.is_blocked(), "tests/conftest.py should have called block_network()"
    for name in ("connect", "connect_ex", "sendto", "create_connection", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setitem(offline._originals, name, _tripwire)


def test_guard_is_installed_in_the_test_process():
    assert offline.is_blocked()
    assert socket.socket.connect is offline._guarded_connect
    assert socket.create_connection is offline._guarded_create_connection
    assert socket.getaddrinfo is offline._guarded_getaddrinfo
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("attempt", [
    pytest.param(lambda: socket.create_connection(PUBLIC, timeout=30), id="create_connection"),
    pytest.param(lambda: socket.socket().connect(PUBLIC), id="socket.connect"),
    pytest.param(lambda: socket.socket().connect_ex(PUBLIC), id="socket.connect_ex"),
    pytest.param(lambda: socket.socket(socket.AF_INET6).connect(("2606:4700::1", 443, 0, 0)),
                 id="ipv6-connect"),
    pytest.param(lambda: socket.socket(socket.AF_INET6).connect(("::ffff:93.184.216.34", 80)),
                 id="ipv4-mapped-ipv6"),
    pytest.param(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", PUBLIC),
                 id="udp-sendto"),
    pytest.param(lambda: socket.getaddrinfo("example.com", 443), id="dns-getaddrinfo"),
    pytest.param(lambda: socket.gethostbyname("huggingface.co"), id="dns-gethostbyname"),
    pytest.param(lambda: socket.socket().connect(("huggingface.co", 443)), id="connect-by-name"),
])
def test_public_address_is_refused_at_once(tripwired, attempt):
    before = len(offline.blocked_attempts())
    t0 = time.perf_counter()
    with pytest.raises(NetworkBlockedError) as info:
        attempt()
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"refusal took {elapsed:.2f} s; it must not wait for a timeout"
    assert "blocked by tests/offline_guard.py" in str(info.value)
    assert isinstance(info.value, ConnectionError)  # what an offline machine would raise
    assert len(offline.blocked_attempts()) == before + 1


def test_http_client_gets_the_error(tripwired):
    """urllib (and so requests/urllib3, which use the same socket calls) sees the refusal."""
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen("http://93.184.216.34/", timeout=30)
    assert isinstance(info.value.reason, NetworkBlockedError)


def test_refusals_are_logged_for_the_session_summary(tripwired):
    log = Path(os.environ[offline.LOG_ENV])
    before = log.read_text().count("\n") if log.exists() else 0
    with pytest.raises(NetworkBlockedError):
        socket.create_connection(PUBLIC)
    lines = log.read_text().splitlines()
    assert len(lines) == before + 1
    assert f"pid {os.getpid()}" in lines[-1] and "93.184.216.34" in lines[-1]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_still_works(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = host if host != "localhost" else "127.0.0.1"
    try:
        server = socket.socket(family)
        server.bind((bind_host, 0))
    except OSError as e:  # e.g. no IPv6 on this machine
        pytest.skip(f"cannot listen on {bind_host}: {e}")
    server.listen(1)
    port = server.getsockname()[1]
    received = []

    def serve():
        conn, _ = server.accept()
        received.append(conn.recv(5))
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(b"hello")
    thread.join(10)
    server.close()
    assert received == [b"hello"]


def test_unix_sockets_are_allowed():
    a, b = socket.socketpair()
    a.sendall(b"ok")
    assert b.recv(2) == b"ok"
    a.close()
    b.close()


def test_allow_and_block_restore_the_socket_module():
    with offline.network_blocked():  # already blocked: stays blocked afterwards
        assert offline.is_blocked()
    assert offline.is_blocked()
    offline.allow_network()
    try:
        assert not offline.is_blocked()
        assert socket.socket.connect is not offline._guarded_connect
        assert socket.getaddrinfo is not offline._guarded_getaddrinfo
    finally:
        offline.block_network()
    assert socket.socket.connect is offline._guarded_connect


KERNEL_CELL = """\
import os, socket, sys, time
import offline_guard as offline  # on sys.path from the kernel's startup file

def tripwire(*args, **kwargs):
    raise AssertionError("the kernel's guard let a public connection through")

for name in list(offline._originals):
    if name != "getaddrinfo":
        offline._originals[name] = tripwire
t0 = time.perf_counter()
try:
    socket.create_connection(("93.184.216.34", 80), timeout=30)
    outcome = "connected"
except offline.NetworkBlockedError as e:
    outcome = type(e).__name__
print(outcome, offline.is_blocked(), os.getpid(), round(time.perf_counter() - t0, 3),
      os.environ.get("HF_HUB_OFFLINE"), sys.executable)
"""


@pytest.mark.timeout(180)
def test_guard_is_active_inside_a_notebook_kernel():
    """A kernel started the way nbval starts them inherits the guard from IPYTHONDIR."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(KERNEL_CELL)]
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={
        "metadata": {"path": str(ROOT)}})
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    outcome, blocked, pid, seconds, hf_offline, executable = text.split()
    assert outcome == "NetworkBlockedError", text
    assert blocked == "True"
    assert float(seconds) < 1.0
    assert hf_offline == "1"
    assert int(pid) != os.getpid()  # it really ran in another process
    assert Path(executable).resolve().parent == Path(sys.executable).resolve().parent
    log = Path(os.environ[offline.LOG_ENV]).read_text()
    assert f"pid {pid}: connect to ('93.184.216.34', 80)" in log
