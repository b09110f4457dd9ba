"""Read a pcap file with the real tshark (Debian package ``tshark``): what Wireshark's SIP dissector sees."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

TSHARK: Final = shutil.which("tshark")
FIELDS: Final = ("frame.number", "sip.Method", "sip.Status-Code", "sip.Call-ID", "tcp.checksum.status",
                 "ip.checksum.status")  # fmt: skip


def require_tshark() -> str:
    """tshark's path. Without it the test is skipped, except in CI (``CI`` set), where it fails:
    scripts/install-and-test.sh installs tshark there, so its absence is a broken setup, not a reason to skip.
    """
    if TSHARK is None:
        missing = "tshark is not installed (Debian package tshark; scripts/install-and-test.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}, and CI is set: the pcap checks must run there", pytrace=False)
        pytest.skip(missing)
    return TSHARK


@dataclass(frozen=True)
class SipRow:
    """One SIP message as tshark dissected it."""

    frame: int
    method: str
    status: int
    call_id: str
    tcp_checksum_ok: bool
    ip_checksum: str  # "1" good, "" for IPv6 (no header checksum)


def dissect(pcap: bytes, *sip_ports: int) -> list[SipRow]:
    """The SIP messages tshark finds in ``pcap``, decoding TCP on ``sip_ports`` as SIP (5060 needs no hint).

    Checksums are verified (tshark skips that unless asked), so a wrong one shows in the rows.
    """
    assert TSHARK is not None, "tshark is not installed"
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "call.pcap"
        path.write_bytes(pcap)
        command = [TSHARK, "-r", str(path), "-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE"]
        for port in sip_ports:
            command += ["-d", f"tcp.port=={port},sip"]
        command += ["-Y", "sip", "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"]
        for field in FIELDS:
            command += ["-e", field]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rows = []
    for line in done.stdout.splitlines():
        frame, method, status, call_id, tcp_ok, ip_ok = line.split("\t")
        rows.append(SipRow(int(frame), method, int(status or 0), call_id, tcp_ok == "1", ip_ok))
    return rows
