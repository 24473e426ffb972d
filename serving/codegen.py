"""Generate the Python stubs of proto/pensieve/v1/pensieve.proto into serving/pensieve/v1/.

    python -m serving.codegen            # regenerate in place (needs grpcio-tools)

The generated modules import each other as `serving.pensieve.v1...` so they work as a package;
tests/serving/test_proto.py fails when the checked-in files differ from a fresh generation.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "pensieve/v1/pensieve.proto"
PACKAGE_DIR = ROOT / "serving"
OUTPUTS = ("pensieve/v1/pensieve_pb2.py", "pensieve/v1/pensieve_pb2_grpc.py",
           "pensieve/v1/pensieve_pb2.pyi")


def _fix_imports(text: str) -> str:
    """protoc writes imports rooted at the proto path (`pensieve.v1`); ours live in `serving`."""
    return (text.replace("from pensieve.v1 import", "from serving.pensieve.v1 import")
                .replace("'pensieve.v1.pensieve_pb2'", "'serving.pensieve.v1.pensieve_pb2'"))


def generate(out_dir: pathlib.Path | str) -> list[pathlib.Path]:
    """Write the stubs under out_dir (as out_dir/pensieve/v1/...); returns the files written."""
    from grpc_tools import protoc
    import grpc_tools
    out_dir = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                          f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                          str(PROTO_ROOT / PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit status {rc}")
        written = []
        for name in OUTPUTS:
            target = out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_fix_imports((pathlib.Path(tmp) / name).read_text()))
            written.append(target)
    return written


def main() -> None:
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
