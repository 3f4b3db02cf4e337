"""Generates the Python gRPC stubs of the fairrank.v1 API from proto/ with grpcio-tools.

The stubs go to ``examples/python/generated/`` (git-ignored) as the package
``fairrank.v1`` (``ranker_pb2``, ``ranker_pb2_grpc``, ``admin_pb2``, ...), with ``.pyi``
type stubs. ``client.py`` calls :func:`ensure_generated` on import, so running this
script by hand is only needed to look at the generated code::

    python generate.py            # regenerate if proto/ or grpcio-tools changed
    python generate.py --force    # regenerate unconditionally

No system ``protoc`` is needed: grpcio-tools bundles the compiler and the well-known
types (``google/protobuf/struct.proto`` and friends).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parent
"""This folder (``examples/python``)."""

PROTO_DIR = EXAMPLE_DIR.parent.parent / "proto"
"""The repository's ``proto/`` folder, the include root of the ``.proto`` files."""

GENERATED_DIR = EXAMPLE_DIR / "generated"
"""Where the generated package ``fairrank.v1`` is written; put it on ``sys.path``."""

PACKAGE_DIR = Path("fairrank") / "v1"
"""The protobuf package compiled here, as a path below :data:`PROTO_DIR`."""

STAMP_NAME = ".stamp"
"""File in :data:`GENERATED_DIR` recording what the stubs were generated from."""


class GenerationError(RuntimeError):
    """``protoc`` (from grpcio-tools) failed or the ``.proto`` files are missing."""


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """The ``fairrank.v1`` ``.proto`` files, sorted, as paths below ``proto_dir``."""
    package = proto_dir / PACKAGE_DIR
    files = sorted(path.relative_to(proto_dir) for path in package.glob("*.proto"))
    if not files:
        raise GenerationError(f"no .proto files in {package}")
    return files


def source_fingerprint(proto_dir: Path = PROTO_DIR) -> str:
    """A digest of the ``.proto`` files' names and contents and of the grpcio-tools version.

    The stubs are regenerated whenever it changes.
    """
    digest = hashlib.sha256()
    digest.update(importlib.metadata.version("grpcio-tools").encode())
    for relative in proto_files(proto_dir):
        digest.update(b"\0" + relative.as_posix().encode() + b"\0")
        digest.update((proto_dir / relative).read_bytes())
    return digest.hexdigest()


def _well_known_types_dir() -> Path:
    """The include folder of the well-known ``.proto`` files shipped with grpcio-tools."""
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def generate(out_dir: Path = GENERATED_DIR, proto_dir: Path = PROTO_DIR) -> Path:
    """Compiles the ``fairrank.v1`` protos into ``out_dir`` (replacing its content).

    The stubs are written to a temporary folder next to ``out_dir`` first and moved into
    place at the end, so a failed or concurrent run never leaves half a package.
    Returns ``out_dir``.
    """
    from grpc_tools import protoc

    files = proto_files(proto_dir)
    fingerprint = source_fingerprint(proto_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".generated-", dir=out_dir.parent))
    try:
        arguments = [
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={_well_known_types_dir()}",
            f"--python_out={staging}",
            f"--pyi_out={staging}",
            f"--grpc_python_out={staging}",
            *(str(relative) for relative in files),
        ]
        status = protoc.main(arguments)
        if status != 0:
            raise GenerationError(
                f"protoc exited with status {status} compiling {proto_dir / PACKAGE_DIR}"
            )
        # Regular packages (not namespace packages), so another `fairrank` folder
        # elsewhere on sys.path cannot shadow or merge with the generated one.
        for package in (staging / "fairrank", staging / PACKAGE_DIR):
            (package / "__init__.py").write_text(
                '"""Generated from proto/ by examples/python/generate.py."""\n'
            )
        (staging / STAMP_NAME).write_text(fingerprint + "\n")
        previous = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(previous, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, previous)
        os.replace(staging, out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def is_current(out_dir: Path = GENERATED_DIR, proto_dir: Path = PROTO_DIR) -> bool:
    """Whether ``out_dir`` holds stubs generated from the current protos and grpcio-tools."""
    stamp = out_dir / STAMP_NAME
    try:
        recorded = stamp.read_text().strip()
    except OSError:
        return False
    return recorded == source_fingerprint(proto_dir)


def ensure_generated(out_dir: Path = GENERATED_DIR, proto_dir: Path = PROTO_DIR) -> Path:
    """Generates the stubs unless they are current; returns the folder to put on ``sys.path``."""
    if not is_current(out_dir, proto_dir):
        generate(out_dir, proto_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python generate.py [--force] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if the stubs are current"
    )
    parser.add_argument(
        "--out", type=Path, default=GENERATED_DIR, help=f"output folder (default {GENERATED_DIR})"
    )
    args = parser.parse_args(argv)
    try:
        if args.force or not is_current(args.out):
            generate(args.out)
            print(f"generated {args.out}")
        else:
            print(f"{args.out} is current")
    except GenerationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
