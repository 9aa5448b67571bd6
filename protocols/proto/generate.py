"""Regenerate the committed gRPC stubs from ``registry.proto``.

Run from anywhere::

    python -m protocols.proto.generate            # rewrite the stubs in place
    python -m protocols.proto.generate --out DIR  # write them under DIR/protocols/proto/ instead

Needs ``grpcio-tools`` (a dev dependency); the runtime needs only ``grpcio`` and ``protobuf``.
The proto is compiled with the repository root as include path, so the generated
``registry_pb2_grpc.py`` imports ``protocols.proto.registry_pb2`` (an absolute import that works
from an installed package).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["PROTO_FILES", "GENERATED_SUFFIXES", "generate", "main"]

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent
PROTO_FILES: tuple[str, ...] = ("registry.proto",)
GENERATED_SUFFIXES: tuple[str, ...] = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_root: Path | None = None) -> list[Path]:
    """Compile every proto of this package; write the stubs under ``out_root/protocols/proto``
    (default: in place). Returns the paths written."""
    try:
        from grpc_tools import protoc
    except ModuleNotFoundError as exc:  # pragma: no cover - dev dependency
        raise SystemExit(
            "grpcio-tools is needed to regenerate the stubs: pip install 'scarches-fl[dev]'"
        ) from exc
    import importlib.resources

    out_root = Path(out_root) if out_root is not None else _ROOT
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        # Copy the protos to a scratch tree so the output path mirrors the package path.
        (tmp_root / "src" / "protocols" / "proto").mkdir(parents=True)
        for name in PROTO_FILES:
            shutil.copyfile(_HERE / name, tmp_root / "src" / "protocols" / "proto" / name)
        (tmp_root / "out").mkdir()
        well_known = str(importlib.resources.files("grpc_tools") / "_proto")
        args = [
            "grpc_tools.protoc",
            f"-I{tmp_root / 'src'}",
            f"-I{well_known}",
            f"--python_out={tmp_root / 'out'}",
            f"--pyi_out={tmp_root / 'out'}",
            f"--grpc_python_out={tmp_root / 'out'}",
            *[f"protocols/proto/{name}" for name in PROTO_FILES],
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        written: list[Path] = []
        dest = out_root / "protocols" / "proto"
        dest.mkdir(parents=True, exist_ok=True)
        for produced in sorted((tmp_root / "out" / "protocols" / "proto").iterdir()):
            if not produced.name.endswith(GENERATED_SUFFIXES):
                continue
            target = dest / produced.name
            shutil.copyfile(produced, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="root to write under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
