"""Regenerate the checked-in Python stubs of protos/secfwt/v1/*.proto, or check they are current.

    python protos/generate.py           # `make protos`: write secfwt/v1/*_pb2.py, *_pb2.pyi,
                                        # *_pb2_grpc.py
    python protos/generate.py --check   # `make check-protos` (CI): regenerate into a temp dir, diff

The .proto files live under protos/ at the path of their Python package (secfwt/v1), and protoc
runs with ``-I protos`` and ``--python_out=.``: the generated modules land in the ``secfwt.v1``
package and import each other as ``from secfwt.v1 import party_pb2`` (no sys.path tricks).
The stubs are checked in so that installing secfwt needs no protoc; they must come from the
pinned grpcio-tools below, because its output differs between releases.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.85.1"  # keep equal to the dev pin in pyproject.toml
ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("secfwt") / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _protos() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def _generate(out: Path) -> list[Path]:
    """Run protoc on every .proto into ``out``; return the generated files relative to ``out``."""
    try:
        have = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(
            "generate.py: grpcio-tools is not installed; `pip install "
            f"grpcio-tools=={GRPCIO_TOOLS_VERSION}` (or `make setup`)"
        )
    if have != GRPCIO_TOOLS_VERSION:
        sys.exit(
            f"generate.py: grpcio-tools {have} is installed but the stubs are pinned to "
            f"{GRPCIO_TOOLS_VERSION}; install that version"
        )
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in _protos()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("generate.py: protoc failed (see above)")
    return sorted(
        p.relative_to(out) for p in (out / PACKAGE_DIR).iterdir() if p.name.endswith(SUFFIXES)
    )


def _checked_in() -> list[Path]:
    return sorted(
        p.relative_to(ROOT) for p in (ROOT / PACKAGE_DIR).iterdir() if p.name.endswith(SUFFIXES)
    )


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _generate(Path(tmp))
        stale = 0
        for rel in sorted(set(fresh) | set(_checked_in())):
            new, old = Path(tmp) / rel, ROOT / rel
            a = old.read_text(encoding="utf-8").splitlines(keepends=True) if old.exists() else []
            b = new.read_text(encoding="utf-8").splitlines(keepends=True) if new.exists() else []
            if a != b:
                stale += 1
                sys.stdout.writelines(
                    difflib.unified_diff(a, b, f"checked-in/{rel}", f"regenerated/{rel}")
                )
    if stale:
        print(
            f"check-protos: {stale} generated file(s) differ from protos/; run `make protos` and "
            "commit the result",
            file=sys.stderr,
        )
        return 1
    print(
        f"check-protos: {len(fresh)} generated files match protos/ (grpcio-tools "
        f"{GRPCIO_TOOLS_VERSION})"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temp dir and fail if the checked-in stubs differ",
    )
    if ap.parse_args().check:
        return check()
    files = _generate(ROOT)
    print("generated: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
