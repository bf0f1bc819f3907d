"""Packet capture of a job's traffic and the checks on it (tcpdump to capture, tshark to dissect).

Two independent checks, both able to fail:

* :func:`non_tls_segments`: every TCP segment with payload between the daemons is part of a TLS
  record (tshark reassembles streams on the daemons' ports and dissects them as TLS); any other
  payload is listed.
* :func:`find_plaintext`: raw byte windows of a known tensor (e.g. the word-embedding table the
  model owner discloses to the data owner, sent as raw float32) searched for in the captured
  frames. Over gloo it is found (the control); over the TLS mesh it must not be.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
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


def non_tls_segments(pcap: Path, ports: list[int]) -> list[str]:
    """TCP segments with payload that tshark cannot place in a TLS record on ``ports``."""
    return _tshark(
        pcap,
        ports,
        "-Y",
        "tcp.len > 0 and not tls and not tcp.reassembled_in and not tcp.analysis.retransmission",
        "-T",
        "fields",
        "-e",
        "frame.number",
        "-e",
        "ip.src",
        "-e",
        "tcp.srcport",
        "-e",
        "ip.dst",
        "-e",
        "tcp.dstport",
        "-e",
        "tcp.len",
    )


def tensor_windows(x: torch.Tensor, *, count: int = 8, width: int = 48) -> list[bytes]:
    """``count`` byte windows of ``x``'s raw little-endian bytes, spread over the tensor."""
    raw = x.detach().contiguous().numpy().tobytes()
    step = max(1, (len(raw) - width) // count)
    return [raw[i : i + width] for i in range(0, step * count, step)][:count]


def find_plaintext(pcap: Path, windows: list[bytes]) -> int:
    """How many of ``windows`` occur verbatim in the capture file."""
    data = pcap.read_bytes()
    return sum(1 for w in windows if w in data)
