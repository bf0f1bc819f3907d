"""Packet capture of a job's traffic and the checks on it (tcpdump to capture, tshark to dissect).

Two independent checks, both able to fail:

* :func:`tls_streams`: every TCP payload byte between the daemons is inside a TLS record. Each
  connection is reassembled per direction by sequence number straight from the pcap file and its
  bytes are walked as TLS records (:func:`walk_tls`) from the first to the last; the first byte
  outside a record is reported with its offset. No dissector heuristics are involved.
* :func:`find_plaintext`: raw byte windows of a known tensor (e.g. the word-embedding table the
  model owner discloses to the data owner, sent as raw float32) searched for in the captured
  frames. Over gloo it is found (the control); over the TLS mesh it must not be.
"""

from __future__ import annotations

import re
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch


def tools_missing() -> list[str]:
    return [t for t in ("tcpdump", "tshark") if shutil.which(t) is None]


class Capture:
    """``tcpdump -i IFACE -w FILE FILTER`` for the duration of a ``with`` block."""

    def __init__(self, path: Path, *, iface: str, bpf: str, netns: str | None = None) -> None:
        self.path, self.iface, self.bpf, self.netns = path, iface, bpf, netns
        self.proc: subprocess.Popen | None = None
        self.dropped: int | None = None  # packets the kernel dropped before tcpdump saw them

    def __enter__(self) -> Capture:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        # -U: write each packet as it arrives; -s 0: whole frames; -B: a 128 MiB kernel buffer (no
        # drops on a loaded 2-core machine); -Z root: keep writing as root.
        self.proc = subprocess.Popen(
            [
                *prefix,
                "tcpdump",
                "-i",
                self.iface,
                "-s",
                "0",
                "-B",
                "131072",
                "-U",
                "-Z",
                "root",
                "-w",
                str(self.path),
                self.bpf,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # tcpdump says "listening on" once the capture is live
            if self.path.exists():
                break
            time.sleep(0.1)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
        m = re.search(rb"(\d+) packets? dropped by kernel", err or b"")
        self.dropped = int(m.group(1)) if m else None


def _tshark(pcap: Path, ports: list[int], *args: str) -> list[str]:
    decode = [a for p in ports for a in ("-d", f"tcp.port=={p},tls")]
    r = subprocess.run(
        [
            "tshark",
            "-n",
            "-2",
            "-r",
            str(pcap),
            "-o",
            "tcp.desegment_tcp_streams:TRUE",
            "-o",
            "tls.desegment_ssl_records:TRUE",
            *decode,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"tshark failed ({r.returncode}): {r.stderr[-2000:]}")
    return [line for line in r.stdout.splitlines() if line.strip()]


def summary(pcap: Path, ports: list[int]) -> dict[str, int]:
    """Frames, TCP payload bytes, TLS records by content type, TLS 1.3 server hellos."""
    payload = _tshark(pcap, ports, "-Y", "tcp.len > 0", "-T", "fields", "-e", "tcp.len")
    types = _tshark(
        pcap, ports, "-Y", "tls.record", "-T", "fields", "-e", "tls.record.content_type"
    )
    hellos = _tshark(
        pcap,
        ports,
        "-Y",
        "tls.handshake.type == 2",
        "-T",
        "fields",
        "-e",
        "tls.handshake.extensions.supported_version",
    )
    counts: dict[str, int] = {
        "tcp_segments_with_payload": len(payload),
        "tcp_payload_bytes": sum(int(x) for x in payload),
    }
    for line in types:
        for t in line.split(","):
            counts[f"tls_records_type_{t}"] = counts.get(f"tls_records_type_{t}", 0) + 1
    counts["server_hellos"] = len(hellos)
    counts["server_hellos_tls13"] = sum(1 for h in hellos if "0x0304" in h)
    return counts


def tensor_windows(x: torch.Tensor, *, count: int = 8, width: int = 48) -> list[bytes]:
    """``count`` byte windows of ``x``'s raw little-endian bytes, spread over the tensor."""
    raw = x.detach().contiguous().numpy().tobytes()
    step = max(1, (len(raw) - width) // count)
    return [raw[i : i + width] for i in range(0, step * count, step)][:count]


def find_plaintext(pcap: Path, windows: list[bytes]) -> int:
    """How many of ``windows`` occur verbatim in the capture file."""
    data = pcap.read_bytes()
    return sum(1 for w in windows if w in data)


# ---------------------------------------------------------------------------------------------
# Exact check: every TCP payload byte is inside a TLS record.
#
# The capture file is read directly (classic pcap, as ``tcpdump -w`` writes it), each TCP
# connection's payload is reassembled per direction by sequence number, and the reassembled bytes
# are walked as TLS records from the first byte to the last. Nothing depends on a dissector's
# heuristics (segment sizes from GSO/GRO, reordering, retransmissions).

TLS_CONTENT_TYPES = frozenset({20, 21, 22, 23})  # change_cipher_spec, alert, handshake, app data
TLS_MAX_RECORD = 2**14 + 256  # TLSCiphertext.length bound (RFC 8446 5.2)
TLS_HEADER = 5


@dataclass(frozen=True)
class Walk:
    """The result of walking one byte stream as TLS records."""

    length: int  # bytes in the stream
    walked: int  # bytes covered by complete records (== length when ``error`` is None)
    records: int  # complete records
    error: str | None = None  # why the walk stopped, or None
    offset: int | None = None  # first byte not inside a TLS record (with ``error``)
    preview: str = ""  # hex of up to 16 bytes from ``offset``
    truncated_tail: bool = False  # the stream ends inside its last record (tolerated)


def walk_tls(data: bytes, *, complete: bool) -> Walk:
    """Walk ``data`` as back-to-back TLS records from its first byte to its last.

    A record is a 5-byte header (content type in {20, 21, 22, 23}; legacy version 0x0301..0x0303,
    0x0301 being what a ClientHello record may carry; length <= 2^14 + 256) followed by that many
    bytes. Any byte that is not inside a record is an error at its offset.

    ``complete``: the stream is known to end where ``data`` ends (its FIN was captured with
    nothing missing before it). Then a last record that runs past the end is an error too.
    Otherwise the capture may have stopped while that record was in flight: only the last
    record may be cut (header or body), and the walk reports ``truncated_tail``.
    """
    n, pos, records = len(data), 0, 0
    mv = memoryview(data)

    def fail(why: str, at: int) -> Walk:
        return Walk(n, pos, records, why, at, bytes(mv[at : at + 16]).hex(" "))

    while pos < n:
        if n - pos < TLS_HEADER:
            if complete:
                return fail(f"stream ends {n - pos} bytes into a record header", pos)
            ctype = data[pos]
            if ctype not in TLS_CONTENT_TYPES:  # the bytes present must still look like a header
                return fail(f"content type {ctype} is not a TLS record type", pos)
            return Walk(n, pos, records, truncated_tail=True)
        ctype = data[pos]
        version = (data[pos + 1] << 8) | data[pos + 2]
        length = (data[pos + 3] << 8) | data[pos + 4]
        if ctype not in TLS_CONTENT_TYPES:
            return fail(f"content type {ctype} is not a TLS record type", pos)
        if not 0x0301 <= version <= 0x0303:
            return fail(f"record version 0x{version:04x} is not 0x0301..0x0303", pos)
        if length > TLS_MAX_RECORD:
            return fail(f"record length {length} > {TLS_MAX_RECORD}", pos)
        end = pos + TLS_HEADER + length
        if end > n:
            if complete:
                return fail(f"stream ends {n - pos} bytes into a {length}-byte record", pos)
            return Walk(n, pos, records, truncated_tail=True)
        pos, records = end, records + 1
    return Walk(n, pos, records)


@dataclass
class _Direction:
    """One direction of a TCP connection: its segments as (sequence number, payload)."""

    isn: int | None = None  # the SYN's sequence number; data starts at isn + 1
    fin: int | None = None  # sequence number of the FIN (one past the last data byte)
    rst: bool = False
    segments: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class StreamReport:
    """One direction of one TCP connection and the TLS walk of its bytes."""

    src: str
    dst: str
    walk: Walk | None  # None: the bytes could not be reassembled (see ``problem``)
    problem: str | None = None  # reassembly problem (start not captured, hole, conflict)
    complete: bool = False  # the FIN was captured with every byte before it
    reset: bool = False  # an RST was captured in this direction

    @property
    def ok(self) -> bool:
        return self.problem is None and self.walk is not None and self.walk.error is None

    def line(self) -> str:
        w = self.walk
        head = f"{self.src} -> {self.dst}:"
        if self.problem is not None:
            return f"{head} NOT CHECKED: {self.problem}"
        assert w is not None
        s = f"{head} {w.length} bytes, {w.walked} walked, {w.records} records, "
        if self.complete:
            s += "FIN captured"
        else:
            s += "reset" if self.reset else "open at the end of the capture"
        if w.truncated_tail:
            s += f", last record cut at the end of the capture ({w.length - w.walked} bytes)"
        if w.error is not None:
            s += f"; NOT TLS at offset {w.offset}: {w.error} [{w.preview}]"
        return s


def _pcap_packets(pcap: Path) -> Iterator[tuple[int, bytes, int]]:
    """(link type, captured bytes, original length) of each packet of a classic pcap file."""
    buf = pcap.read_bytes()
    if len(buf) < 24:
        raise ValueError(f"{pcap}: not a pcap file ({len(buf)} bytes)")
    magic = buf[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{pcap}: not a classic pcap file (magic {magic.hex()}); pcapng?")
    linktype = struct.unpack_from(endian + "I", buf, 20)[0] & 0x0FFFFFFF
    pos, rec = 24, struct.Struct(endian + "IIII")
    while pos + 16 <= len(buf):
        _, _, caplen, origlen = rec.unpack_from(buf, pos)
        pos += 16
        if pos + caplen > len(buf):
            raise ValueError(f"{pcap}: last packet cut ({caplen} bytes announced)")
        yield linktype, buf[pos : pos + caplen], origlen
        pos += caplen


def _ip_payload(linktype: int, frame: bytes) -> tuple[int, bytes] | None:
    """(IP version, IP packet) of a frame, or None for a frame that carries no IP."""
    if linktype == 1:  # Ethernet (a bridge, veths, lo)
        off, etype = 14, int.from_bytes(frame[12:14], "big")
        while etype in (0x8100, 0x88A8):  # VLAN tags
            etype, off = int.from_bytes(frame[off + 2 : off + 4], "big"), off + 4
    elif linktype == 113:  # Linux cooked (any)
        off, etype = 16, int.from_bytes(frame[14:16], "big")
    elif linktype == 276:  # Linux cooked v2
        off, etype = 20, int.from_bytes(frame[0:2], "big")
    elif linktype in (101, 12):  # raw IP
        off, etype = 0, {4: 0x0800, 6: 0x86DD}.get(frame[0] >> 4, 0) if frame else 0
    elif linktype == 0:  # BSD loopback
        off, etype = 4, {2: 0x0800, 24: 0x86DD, 28: 0x86DD, 30: 0x86DD}.get(frame[0] or frame[3], 0)
    else:
        raise ValueError(f"link type {linktype} not supported")
    if etype == 0x0800:
        return 4, frame[off:]
    if etype == 0x86DD:
        return 6, frame[off:]
    return None


def _tcp_segments(pcap: Path) -> Iterator[tuple[str, str, bytes, int, int]]:
    """(source ip:port, destination ip:port, TCP header + payload, flags, sequence number)."""
    import ipaddress

    for number, (linktype, frame, origlen) in enumerate(_pcap_packets(pcap), start=1):
        if len(frame) != origlen:
            raise ValueError(
                f"packet {number} captured {len(frame)} of {origlen} bytes: the snap length "
                "truncated it, the capture cannot be checked byte for byte"
            )
        ip = _ip_payload(linktype, frame)
        if ip is None:
            continue
        version, pkt = ip
        if version == 4:
            ihl, total = (pkt[0] & 0x0F) * 4, int.from_bytes(pkt[2:4], "big")
            frag = int.from_bytes(pkt[6:8], "big")
            if pkt[9] != 6:
                continue
            if frag & 0x3FFF:  # more fragments, or a fragment offset
                raise ValueError(f"packet {number}: fragmented IPv4 TCP is not reassembled")
            # total == 0: a GSO/TSO super-packet whose length field the kernel left unset
            body = pkt[ihl:total] if total else pkt[ihl:]
            src, dst = ipaddress.ip_address(pkt[12:16]), ipaddress.ip_address(pkt[16:20])
        else:
            if pkt[6] != 6:  # extension headers are not followed
                continue
            plen = int.from_bytes(pkt[4:6], "big")
            body = pkt[40 : 40 + plen] if plen else pkt[40:]
            src, dst = ipaddress.ip_address(pkt[8:24]), ipaddress.ip_address(pkt[24:40])
        sport, dport = int.from_bytes(body[0:2], "big"), int.from_bytes(body[2:4], "big")
        seq = int.from_bytes(body[4:8], "big")
        doff, flags = (body[12] >> 4) * 4, body[13]
        yield f"{src}:{sport}", f"{dst}:{dport}", body[doff:], flags, seq


_SYN, _FIN, _RST = 0x02, 0x01, 0x04


def _reassemble(d: _Direction) -> tuple[bytes | None, bool, str | None]:
    """(bytes, known complete, problem) of one direction, by sequence number."""
    if d.isn is None:
        if not d.segments:
            return b"", False, None
        return None, False, "its SYN is not in the capture (connection opened before it started)"
    base = (d.isn + 1) & 0xFFFFFFFF
    # by stream offset; copies of the same offset stay in capture order (the first is the reference)
    segs = sorted((((s - base) & 0xFFFFFFFF, p) for s, p in d.segments), key=lambda x: x[0])
    out = bytearray()
    for off, payload in segs:
        if off >= 2**31:  # before the first data byte: a keep-alive probe or a stale copy
            continue
        if off > len(out):
            return None, False, f"bytes {len(out)}..{off} are missing from the capture"
        overlap = payload[: len(out) - off]
        if overlap != bytes(out[off : off + len(overlap)]):
            return None, False, f"retransmitted bytes at offset {off} differ from the first copy"
        out += payload[len(overlap) :]
    if d.fin is None:
        return bytes(out), False, None
    end = (d.fin - base) & 0xFFFFFFFF
    if end > len(out):
        return None, False, f"bytes {len(out)}..{end} before the FIN are missing from the capture"
    if end < len(out):
        return None, False, f"bytes after the FIN at offset {end} ({len(out)} in all)"
    return bytes(out), True, None


def tls_streams(pcap: Path) -> list[StreamReport]:
    """Each direction of each TCP connection in ``pcap`` that carries payload, walked as TLS.

    A connection is its 4-tuple from one SYN to the next (a reused port pair starts a new one).
    A direction counts as complete when its FIN is captured with every byte before it; only then
    may its last record not be cut. A direction without FIN (the capture stopped while the
    connection was open, or it was reset) may end inside its last record: that is tolerated and
    reported, nothing else is.
    """
    conns: dict[tuple[str, str], list[tuple[str, str, _Direction]]] = {}
    order: list[tuple[str, str, _Direction]] = []
    for src, dst, payload, flags, seq in _tcp_segments(pcap):
        key = (src, dst)
        runs = conns.setdefault(key, [])
        # A SYN with a new sequence number on a 4-tuple already seen opens a new connection.
        if not runs or (flags & _SYN and runs[-1][2].isn not in (None, seq)):
            runs.append((src, dst, _Direction()))
            order.append(runs[-1])
        if flags & _SYN:
            runs[-1][2].isn = seq
            seq = (seq + 1) & 0xFFFFFFFF
        d = runs[-1][2]
        if payload:
            d.segments.append((seq, payload))
        if flags & _FIN:
            d.fin = (seq + len(payload)) & 0xFFFFFFFF
        if flags & _RST:
            d.rst = True
    reports = []
    for src, dst, d in order:
        data, complete, problem = _reassemble(d)
        if problem is not None:
            reports.append(StreamReport(src, dst, None, problem))
        elif data:
            walk = walk_tls(data, complete=complete)
            reports.append(StreamReport(src, dst, walk, complete=complete, reset=d.rst))
    return reports
