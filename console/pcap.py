"""A call's captured messages as a classic pcap file that Wireshark and tshark dissect as SIP.

The transport keeps SIP text, not packets, so the packets are synthesized:
one IPv4 or IPv6 packet (link type RAW, 101: no Ethernet header to invent)
carrying one TCP segment per message (split in :data:`SEGMENT_BYTES` pieces
when larger), with the connection's real addresses and ports and the time
the transport received or queued it. Each (connection, direction) is one
TCP stream whose sequence numbers start at 1 and grow by the bytes carried;
every segment acknowledges what the other direction has sent so far, so
Wireshark follows each connection as one conversation. IP and TCP checksums
are computed. A TLS or WebSocket connection is written as plain TCP on its
real ports: the SIP text is what was carried inside, so a port other than
5060 needs ``-d tcp.port==PORT,sip`` (Wireshark: Decode As).

When the transport withholds bodies (``capture_bodies`` off), a message's
Content-Length is set to 0 and an ``X-Sipwire-Body-Withheld`` header gives
the size of what is missing, so the stream still frames message by message.

Format: https://wiki.wireshark.org/Development/LibpcapFileFormat (magic
a1b2c3d4, version 2.4, microsecond timestamps).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

#: The pcap global header: magic, version 2.4, UTC, accuracy 0, snap length, link type RAW (IPv4 or IPv6).
PCAP_MAGIC: Final = 0xA1B2C3D4
LINKTYPE_RAW: Final = 101
SNAPLEN: Final = 262144
#: TCP payload per synthesized segment: an IPv4 packet holds at most 65,535 bytes with its headers.
SEGMENT_BYTES: Final = 65000
MEDIA_TYPE: Final = "application/vnd.tcpdump.pcap"

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
TCP_PSH_ACK: Final = 0x18
TCP_WINDOW: Final = 65535
TTL: Final = 64
PROTO_TCP: Final = 6
_CONTENT_LENGTH = re.compile(rb"^(content-length|l)[ \t]*:[ \t]*\d+", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class PcapMessage:
    """One message as the pcap needs it: when, which way, on which connection, between which addresses."""

    time: float
    outbound: bool  # sent by the transport (local -> remote); else received (remote -> local)
    connection: int
    local: tuple[str, int]
    remote: tuple[str, int]
    data: bytes


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (as the capture writes them) -> (host, port); ValueError if not."""
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def withheld_body(head: bytes, body_bytes: int) -> bytes:
    """A header block whose body was withheld, re-framed: Content-Length 0 and a header saying how much is missing."""
    head = _CONTENT_LENGTH.sub(rb"\1: 0", head.rstrip(b"\r\n"), count=1)
    return head + b"\r\nX-Sipwire-Body-Withheld: %d\r\n\r\n" % body_bytes


def write_pcap(messages: Iterable[PcapMessage]) -> bytes:
    """The whole pcap file for ``messages`` (in carried order)."""
    parts = [_GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW)]
    next_seq: dict[tuple[int, bool], int] = {}  # (connection, outbound) -> next sequence number
    for message in messages:
        source, destination = (message.local, message.remote) if message.outbound else (message.remote, message.local)
        key = (message.connection, message.outbound)
        seq = next_seq.get(key, 1)
        ack = next_seq.get((message.connection, not message.outbound), 1)
        seconds = int(message.time)
        micros = min(999_999, round((message.time - seconds) * 1_000_000))
        data = message.data
        for start in range(0, max(len(data), 1), SEGMENT_BYTES):
            segment = data[start : start + SEGMENT_BYTES]
            packet = _packet(source, destination, seq, ack, segment)
            parts.append(_RECORD.pack(seconds, micros, len(packet), len(packet)))
            parts.append(packet)
            seq = (seq + len(segment)) & 0xFFFFFFFF
        next_seq[key] = seq
    return b"".join(parts)


def _packet(source: tuple[str, int], destination: tuple[str, int], seq: int, ack: int, payload: bytes) -> bytes:
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version != dst.version:  # an IPv4-mapped peer on an IPv6 socket: write both as IPv6
        src, dst = _as_v6(src), _as_v6(dst)
    tcp_length = _TCP.size + len(payload)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, PROTO_TCP, tcp_length)
    else:
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", tcp_length, PROTO_TCP)
    header = _TCP.pack(source[1], destination[1], seq, ack, 5 << 4, TCP_PSH_ACK, TCP_WINDOW, 0, 0)
    checksum = _checksum(pseudo + header + payload)
    tcp = _TCP.pack(source[1], destination[1], seq, ack, 5 << 4, TCP_PSH_ACK, TCP_WINDOW, checksum, 0) + payload
    if src.version == 4:
        total = _IPV4.size + len(tcp)
        ip = _IPV4.pack(0x45, 0, total, 0, 0x4000, TTL, PROTO_TCP, 0, src.packed, dst.packed)
        ip = _IPV4.pack(0x45, 0, total, 0, 0x4000, TTL, PROTO_TCP, _checksum(ip), src.packed, dst.packed)
    else:
        ip = _IPV6.pack(6 << 28, len(tcp), PROTO_TCP, TTL, src.packed, dst.packed)
    return ip + tcp


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
