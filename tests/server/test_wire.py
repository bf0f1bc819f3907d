"""The wire check without a live capture: the TLS record walker passes back-to-back records and
stops at the first byte that is not inside one, with that byte's offset; the reassembly from a
pcap file (synthetic ones written here) puts segments in sequence order whatever their capture
order, and reports what it cannot check (missing bytes, conflicting copies, no SYN)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from .wire import TLS_MAX_RECORD, tls_streams, walk_tls


def record(ctype: int, body: bytes, version: int = 0x0303) -> bytes:
    return bytes([ctype]) + version.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


#: A TLS 1.3 connection's first bytes: a ClientHello record (legacy version 0x0301), a
#: middlebox-compatibility change_cipher_spec, application data up to the maximum size, an alert.
HELLO = record(22, b"\x01" + bytes(200), version=0x0301)
STREAM = (
    HELLO
    + record(20, b"\x01")
    + record(23, bytes(range(256)) * 8)
    + record(23, b"")
    + record(23, b"\xaa" * TLS_MAX_RECORD)
    + record(21, b"\x01\x00")
)
N_RECORDS = 6


@pytest.mark.parametrize("complete", [True, False])
def test_valid_records_pass(complete: bool) -> None:
    w = walk_tls(STREAM, complete=complete)
    assert (w.error, w.offset, w.truncated_tail) == (None, None, False), w
    assert (w.length, w.walked, w.records) == (len(STREAM), len(STREAM), N_RECORDS)
    assert walk_tls(b"", complete=True).records == 0


def test_stray_plaintext_byte_between_records_fails_at_that_byte() -> None:
    at = len(HELLO)
    data = HELLO + b"\x17" + STREAM[at:]  # even a byte equal to a content type
    w = walk_tls(data, complete=False)
    assert (w.offset, w.records, w.walked) == (at, 1, at), w
    assert "version" in (w.error or ""), w
    assert w.preview.startswith("17 14 03 03"), w


def test_bad_content_type_fails_at_its_header() -> None:
    at = len(HELLO) + 6
    data = STREAM[:at] + b"\x18" + STREAM[at + 1 :]
    w = walk_tls(data, complete=True)
    assert (w.offset, w.records) == (at, 2), w
    assert w.error == "content type 24 is not a TLS record type", w


@pytest.mark.parametrize("version", [0x0300, 0x0304, 0x0203])
def test_bad_version_fails(version: int) -> None:
    data = HELLO + record(23, b"x", version=version)
    w = walk_tls(data, complete=True)
    assert (w.offset, w.records) == (len(HELLO), 1), w


def test_oversize_length_fails_at_its_header() -> None:
    data = HELLO + record(23, b"\x00" * (TLS_MAX_RECORD + 1))
    w = walk_tls(data, complete=False)
    assert (w.offset, w.records) == (len(HELLO), 1), w
    assert w.error == f"record length {TLS_MAX_RECORD + 1} > {TLS_MAX_RECORD}", w


@pytest.mark.parametrize("cut", [1, 3, 5, 6, 100])
def test_record_cut_mid_stream_fails_when_the_stream_is_complete(cut: int) -> None:
    last = record(23, bytes(200))
    data = STREAM + last[:cut]
    w = walk_tls(data, complete=True)
    assert (w.offset, w.records, w.walked) == (len(STREAM), N_RECORDS, len(STREAM)), w
    assert w.error is not None and "stream ends" in w.error, w


@pytest.mark.parametrize("cut", [1, 3, 5, 6, 100])
def test_only_a_last_record_cut_by_the_end_of_the_capture_is_tolerated(cut: int) -> None:
    last = record(23, bytes(200))
    w = walk_tls(STREAM + last[:cut], complete=False)
    assert (w.error, w.truncated_tail, w.records, w.walked) == (
        None,
        True,
        N_RECORDS,
        len(STREAM),
    ), w


def test_a_cut_record_followed_by_more_bytes_fails() -> None:
    """A record cut short inside the stream misaligns what follows: the walk fails where the
    next header should be, capture complete or not."""
    short = record(23, bytes(100))[:50]
    data = HELLO + short + record(23, bytes(100))
    w = walk_tls(data, complete=False)
    # the cut record announces 100 bytes and swallows the next header: the walk goes on from
    # offset len(HELLO) + 105, inside the next record's zeros
    assert w.error is not None and w.offset == len(HELLO) + 105, w


def test_plaintext_at_the_end_of_an_incomplete_stream_still_fails() -> None:
    w = walk_tls(STREAM + b"GET", complete=False)
    assert (w.offset, w.error) == (len(STREAM), "content type 71 is not a TLS record type"), w


# -- reassembly from a capture file --------------------------------------------------------------
# Synthetic pcap files (Ethernet, IPv4, TCP) written here: segments out of order, retransmitted,
# overlapping or missing, as a loaded machine's capture shows them.

CLIENT, SERVER = ("10.0.0.1", 40000), ("10.0.0.2", 7402)
ISN_C, ISN_S = 0xFFFFFF00, 1000  # the client's sequence numbers wrap around 2^32


def frame(
    src: tuple[str, int], dst: tuple[str, int], seq: int, flags: int, payload: bytes
) -> bytes:
    import ipaddress

    tcp = (
        src[1].to_bytes(2, "big")
        + dst[1].to_bytes(2, "big")
        + (seq & 0xFFFFFFFF).to_bytes(4, "big")
        + bytes(4)  # ack
        + bytes([5 << 4, flags])
        + bytes(6)  # window, checksum, urgent
        + payload
    )
    ip = (
        bytes([0x45, 0])
        + (20 + len(tcp)).to_bytes(2, "big")
        + bytes([0, 0, 0x40, 0, 64, 6, 0, 0])
        + ipaddress.ip_address(src[0]).packed
        + ipaddress.ip_address(dst[0]).packed
    )
    return bytes(6) + bytes(6) + b"\x08\x00" + ip + tcp


def write_pcap(path: Path, frames: list[bytes], *, snap: int = 262144) -> Path:
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snap, 1))
    for i, f in enumerate(frames):
        cap = f[:snap]
        out += struct.pack("<IIII", i, 0, len(cap), len(f)) + cap
    path.write_bytes(bytes(out))
    return path


SYN, FIN, ACK, PSH = 0x02, 0x01, 0x10, 0x08


def connection(
    client_bytes: bytes, cuts: list[int], *, order: list[int] | None = None, fin: bool = True
) -> list[bytes]:
    """Frames of a connection whose client sends ``client_bytes`` in segments cut at ``cuts``
    (sent in ``order``), the server one record back."""
    bounds = [0, *cuts, len(client_bytes)]
    segs = [
        frame(CLIENT, SERVER, ISN_C + 1 + a, ACK | PSH, client_bytes[a:b])
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    reply = record(23, b"ok")
    frames = [
        frame(CLIENT, SERVER, ISN_C, SYN, b""),
        frame(SERVER, CLIENT, ISN_S, SYN | ACK, b""),
        *[segs[i] for i in (order if order is not None else range(len(segs)))],
        frame(SERVER, CLIENT, ISN_S + 1, ACK | PSH, reply),
    ]
    if fin:
        frames.append(frame(CLIENT, SERVER, ISN_C + 1 + len(client_bytes), FIN | ACK, b""))
    return frames


def test_out_of_order_and_retransmitted_segments_reassemble_exactly(tmp_path: Path) -> None:
    cuts = [7, 300, 301, 5000, 17000]
    frames = connection(STREAM, cuts, order=[0, 2, 1, 4, 3, 5, 1, 4])  # 1 and 4 sent twice
    # an overlapping retransmission that covers parts of two earlier segments
    frames.insert(5, frame(CLIENT, SERVER, ISN_C + 1 + 250, ACK, STREAM[250:6000]))
    reports = tls_streams(write_pcap(tmp_path / "c.pcap", frames))
    assert [(r.src, r.dst, r.ok, r.complete) for r in reports] == [
        ("10.0.0.1:40000", "10.0.0.2:7402", True, True),
        ("10.0.0.2:7402", "10.0.0.1:40000", True, False),
    ], [r.line() for r in reports]
    assert reports[0].walk is not None and reports[0].walk.records == N_RECORDS
    assert reports[0].walk.length == len(STREAM)


def test_a_plaintext_byte_inside_a_segment_is_found_at_its_stream_offset(tmp_path: Path) -> None:
    at = len(HELLO)
    data = HELLO + b"\x00" + STREAM[at:]
    reports = tls_streams(write_pcap(tmp_path / "p.pcap", connection(data, [100, 210, 4000])))
    w = reports[0].walk
    assert w is not None and (w.offset, w.records) == (at, 1), reports[0].line()
    assert not reports[0].ok and f"NOT TLS at offset {at}:" in reports[0].line()


def test_a_segment_missing_from_the_capture_is_reported_not_skipped(tmp_path: Path) -> None:
    frames = connection(STREAM, [100, 5000, 9000], order=[0, 1, 3])
    r = tls_streams(write_pcap(tmp_path / "m.pcap", frames))[0]
    assert not r.ok and r.problem == "bytes 5000..9000 are missing from the capture", r.line()


def test_missing_bytes_before_the_fin_are_reported(tmp_path: Path) -> None:
    frames = connection(STREAM, [100, 5000], order=[0, 1])
    r = tls_streams(write_pcap(tmp_path / "t.pcap", frames))[0]
    assert not r.ok and r.problem is not None and "missing" in r.problem, r.line()


def test_a_retransmission_with_other_bytes_is_reported(tmp_path: Path) -> None:
    frames = connection(STREAM, [100, 5000])
    frames.append(frame(CLIENT, SERVER, ISN_C + 1 + 100, ACK, b"\xff" * 50))
    r = tls_streams(write_pcap(tmp_path / "r.pcap", frames))[0]
    assert not r.ok and r.problem == (
        "retransmitted bytes at offset 100 differ from the first copy"
    ), r.line()


def test_a_connection_opened_before_the_capture_is_not_passed(tmp_path: Path) -> None:
    frames = connection(STREAM, [100])[2:]  # no SYN, no SYN-ACK
    reports = tls_streams(write_pcap(tmp_path / "n.pcap", frames))
    assert reports and all(not r.ok and "SYN" in (r.problem or "") for r in reports)


def test_a_last_record_cut_by_the_end_of_the_capture_is_tolerated(tmp_path: Path) -> None:
    cut = len(STREAM) - 3  # inside the last record, the 7-byte alert
    frames = connection(STREAM[:cut], [100], fin=False)
    r = tls_streams(write_pcap(tmp_path / "e.pcap", frames))[0]
    assert r.ok and r.walk is not None and r.walk.truncated_tail, r.line()
    assert "last record cut at the end of the capture" in r.line()
    # the same bytes with the FIN captured: the stream is complete and its last record is cut
    frames = connection(STREAM[:cut], [100], fin=True)
    r = tls_streams(write_pcap(tmp_path / "f.pcap", frames))[0]
    assert not r.ok and r.walk is not None and r.walk.offset == len(STREAM) - 7, r.line()


def test_packets_cut_by_the_snap_length_are_refused(tmp_path: Path) -> None:
    pcap = write_pcap(tmp_path / "s.pcap", connection(STREAM, [100]), snap=96)
    with pytest.raises(ValueError, match="snap length"):
        tls_streams(pcap)
