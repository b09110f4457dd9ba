"""The pcap writer read back by the real tshark: SIP dissected, checksums good, TCP streams continuous.

IPv4 and IPv6 in one file, a message larger than one segment, and a withheld
body re-framed so the next message on the stream still dissects.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from sipwire.console.pcap import LINKTYPE_RAW, PCAP_MAGIC, SEGMENT_BYTES, PcapMessage, withheld_body, write_pcap
from tests.test_capture import request, response
from tests.tshark import dissect, require_tshark


@pytest.fixture
def tshark() -> str:
    return require_tshark()


needs_tshark = pytest.mark.usefixtures("tshark")

V4_LOCAL, V4_PEER = ("127.0.0.1", 5070), ("127.0.0.2", 41000)
V6_LOCAL, V6_PEER = ("::1", 5070), ("fd00::7", 41001)


def _flow() -> list[PcapMessage]:
    big = request("MESSAGE", "p1", body=b"y" * (SEGMENT_BYTES + 5000))
    return [
        PcapMessage(1000.000001, False, 1, V4_LOCAL, V4_PEER, request("INVITE", "p1")),
        PcapMessage(1000.25, True, 1, V4_LOCAL, V4_PEER, response(180, "p1")),
        PcapMessage(1000.5, True, 2, V6_LOCAL, V6_PEER, request("INVITE", "p1")),
        PcapMessage(1000.75, False, 2, V6_LOCAL, V6_PEER, response(200, "p1")),
        PcapMessage(1001.0, True, 1, V4_LOCAL, V4_PEER, response(200, "p1")),
        PcapMessage(1001.5, False, 1, V4_LOCAL, V4_PEER, big),
    ]


def test_the_file_layout_is_classic_pcap_with_raw_ip() -> None:
    data = write_pcap(_flow()[:1])
    magic, major, minor, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, linktype) == (PCAP_MAGIC, 2, 4, LINKTYPE_RAW)
    seconds, micros, captured, original = struct.unpack_from("<IIII", data, 24)
    assert (seconds, micros, captured) == (1000, 1, original) and len(data) == 24 + 16 + captured
    assert data[40] == 0x45  # IPv4, 20-byte header


@needs_tshark
def test_tshark_dissects_every_message_with_good_checksums() -> None:
    rows = dissect(write_pcap(_flow()), 5070)
    assert [(row.method or row.status) for row in rows] == ["INVITE", 180, "INVITE", 200, 200, "MESSAGE"]
    assert {row.call_id for row in rows} == {"p1"}
    assert all(row.tcp_checksum_ok for row in rows)
    assert [row.ip_checksum for row in rows] == ["1", "1", "", "", "1", "1"]  # IPv6 has no header checksum


def test_sequence_numbers_run_on_per_direction_and_acknowledge_the_other_side(tmp_path: Path, tshark: str) -> None:
    path = tmp_path / "flow.pcap"
    path.write_bytes(write_pcap(_flow()))
    fields = ["tcp.stream", "tcp.srcport", "tcp.seq_raw", "tcp.ack_raw", "tcp.len", "_ws.expert.message"]
    command = [tshark, "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for field in fields:
        command += ["-e", field]
    lines = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    rows = [line.split("|") for line in lines]
    assert len(rows) == 7  # the large MESSAGE is two segments
    next_seq: dict[tuple[str, str], int] = {}
    for stream, port, seq, ack, length, expert in rows:
        assert "previous segment" not in expert and "retransmission" not in expert.lower(), expert
        key = (stream, port)
        assert int(seq) == next_seq.get(key, 1), (stream, port)
        other = next(((s, p) for (s, p) in next_seq if s == stream and p != port), None)
        assert int(ack) == (next_seq[other] if other else 1)
        next_seq[key] = int(seq) + int(length)
    assert {stream for stream, *_ in rows} == {"0", "1"}  # one TCP conversation per connection


@needs_tshark
def test_a_withheld_body_is_reframed_so_the_stream_still_dissects() -> None:
    invite = request("INVITE", "w1", body=b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n")
    head = invite[: invite.index(b"\r\n\r\n") + 4]
    reframed = withheld_body(head, len(invite) - len(head))
    assert b"Content-Length: 0\r\n" in reframed and b"X-Sipwire-Body-Withheld: 31\r\n\r\n" in reframed
    messages = [
        PcapMessage(1.0, False, 1, V4_LOCAL, V4_PEER, reframed),
        PcapMessage(2.0, False, 1, V4_LOCAL, V4_PEER, request("BYE", "w1")),
    ]
    assert [row.method for row in dissect(write_pcap(messages), 5070)] == ["INVITE", "BYE"]
