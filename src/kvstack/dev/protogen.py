"""Generate the Python code for every .proto under protos/ (`make proto`).

The output goes beside the package (src/kvstack/v1/...): the proto package kvstack.v1 maps onto
the Python package kvstack.v1, so the generated modules import each other without path tricks.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "src"


def generate(out_root: Path = OUT_ROOT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto under proto_root into out_root and return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # protoc-gen-mypy_grpc is installed beside this interpreter by mypy-protobuf.
    plugin = Path(sysconfig.get_path("scripts")) / "protoc-gen-mypy_grpc"
    if not plugin.exists():
        found = shutil.which("protoc-gen-mypy_grpc")
        if found is None:
            raise SystemExit("protoc-gen-mypy_grpc not found: run `make venv` first")
        plugin = Path(found)
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p) for p in protos),
    ]
    for proto in protos:
        (out_root / proto.relative_to(proto_root).parent).mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: see the message above")
    return sorted(
        p
        for proto in protos
        for p in (out_root / proto.relative_to(proto_root).parent).glob(proto.stem + "_pb2*")
    )


def main() -> None:
    for path in generate():
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
