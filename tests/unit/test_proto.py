"""The generated Python code matches the proto tree (`make proto` was run after every change)."""

from __future__ import annotations

import shutil
from pathlib import Path

from kvstack.dev import protogen


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """Regenerating into a temporary directory gives the committed files byte for byte."""
    written = protogen.generate(out_root=tmp_path)
    assert written, "protoc wrote nothing"
    stale = []
    for fresh in written:
        committed = protogen.OUT_ROOT / fresh.relative_to(tmp_path)
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(str(committed.relative_to(protogen.ROOT)))
    assert stale == [], f"generated code is stale: run `make proto` ({stale})"


def test_stale_code_is_detected(tmp_path: Path) -> None:
    """The check above can fail: a proto edited after generation no longer matches."""
    protos = tmp_path / "protos"
    shutil.copytree(protogen.PROTO_ROOT, protos)
    edited = next(protos.rglob("kv.proto"))
    edited.write_text(
        edited.read_text().replace("message Entry {", "message Entry {\n  int32 x = 9;")
    )
    written = protogen.generate(out_root=tmp_path / "out", proto_root=protos)
    pb2 = next(p for p in written if p.name == "kv_pb2.py")
    assert pb2.read_bytes() != (protogen.OUT_ROOT / "kvstack/v1/kv_pb2.py").read_bytes()
