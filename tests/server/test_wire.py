"""The TLS record walker behind the wire check (pure Python, no capture): it passes back-to-back
records and stops at the first byte that is not inside one, with that byte's offset."""

from __future__ import annotations

import pytest

from .wire import TLS_MAX_RECORD, walk_tls


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
