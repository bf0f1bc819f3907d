"""secfwt.crypten_compat: CrypTen imports without loading onnx, and onnx stays importable.

Each check runs in a fresh interpreter: the test process has imported CrypTen already.
"""

from __future__ import annotations

import subprocess
import sys

_FRESH = """
import sys
import secfwt.crypten_compat
import crypten.nn.onnx_converter as converter
print("loaded", "onnx" in sys.modules, "ml_dtypes" in sys.modules)
try:
    converter.onnx.load
except AttributeError as e:
    print("converter", e)
import onnx
print("real", hasattr(onnx, "helper"), converter.onnx is onnx)
"""

_ONNX_FIRST = """
import onnx
import secfwt.crypten_compat
import crypten.nn.onnx_converter as converter
print("same", converter.onnx is onnx, converter.numpy_helper is onnx.numpy_helper)
"""


def _run(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.splitlines()


def test_crypten_imports_without_onnx_and_onnx_imports_after() -> None:
    lines = _run(_FRESH)
    assert lines[0] == "loaded False False"  # neither onnx nor its ml_dtypes was loaded
    assert lines[1].startswith("converter onnx.load: secfwt imports CrypTen without onnx")
    assert lines[2] == "real True False"  # the real package, not the converter's placeholder


def test_onnx_imported_before_is_what_the_converter_gets() -> None:
    assert _run(_ONNX_FIRST) == ["same True True"]
