"""Addresses for processes on this machine: which ones let the OS pick the port, and which ports are taken (and
by whom). Apart from cluster/local.py so that `cluster up` can check its ports before it starts anything."""

from __future__ import annotations

import socket
from dataclasses import fields

from cluster.config import DEFAULT_HOST, Addresses

ADDRESS_FIELDS = tuple(f.name for f in fields(Addresses))


def is_any_port(address: str) -> bool:
    """True for a TCP address that lets the OS pick the port (tcp://host:0 or tcp://host:*)."""
    return address.startswith("tcp://") and address.rsplit(":", 1)[-1] in ("0", "*")


def any_port(address: str) -> str:
    """The same TCP address on port 0 (the OS picks); other transports unchanged."""
    return address.rsplit(":", 1)[0] + ":0" if address.startswith("tcp://") else address


def any_port_addresses(host: str = DEFAULT_HOST) -> Addresses:
    """Every cluster address on `host`, port 0."""
    return Addresses(*(f"tcp://{host}:0" for _ in ADDRESS_FIELDS))


def ports_in_use(wanted: dict[str, str]) -> list[str]:
    """For each {what: tcp://host:port} whose port cannot be bound now, one line saying so and, where this machine
    tells, which process holds it ("pid 1234: python3 -m cluster up"). Port 0 and other transports are skipped."""
    import errno

    taken = []
    for what, address in wanted.items():
        if not address.startswith("tcp://") or is_any_port(address):
            continue
        host, port = address[len("tcp://") :].rsplit(":", 1)
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ and uvicorn bind
            try:
                probe.bind((host if host != "*" else "0.0.0.0", int(port)))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    taken.append(f"{address} ({what}): cannot listen there: {exc.strerror}")
                    continue
                taken.append(f"{address} ({what}) is already in use{_holder(int(port))}")
    return taken


def _holder(port: int) -> str:
    """', by pid N: its command line' for the process listening on `port`, when this machine says (else '')."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                command = " ".join(psutil.Process(conn.pid).cmdline())[:120]
                return f", by pid {conn.pid}: {command}"
    except Exception:  # no psutil, no permission: the port is named all the same
        pass
    return ""
