"""Fails when the generated code under libs/proto differs from what `make protos` would write from protos/."""
from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "libs" / "proto"
DESCRIPTOR_SET = "hotslot/descriptor_set.binpb"  # with source info, for server reflection (as `make protos`)
HAND_WRITTEN = {Path("pyproject.toml")}  # the hotslot-proto distribution's own file, the one thing not generated


def main() -> int:
    # protos/google/ is upstream google.rpc for other languages' clients; Python has it from googleapis-common-protos.
    protos = sorted(
        str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto")
        if p.relative_to(ROOT / "protos").parts[0] != "google"
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / DESCRIPTOR_SET).parent.mkdir(parents=True)
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"),
             f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
             f"--descriptor_set_out={tmp}/{DESCRIPTOR_SET}", "--include_source_info", "--include_imports", *protos],
            check=True,
        )
        fresh = {p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file()}
        current = {
            p.relative_to(GENERATED) for p in GENERATED.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        } - HAND_WRITTEN
        problems = [f"missing (run `make protos`): libs/proto/{p}" for p in sorted(fresh - current)]
        problems += [f"stale, no .proto makes it: libs/proto/{p}" for p in sorted(current - fresh)]
        problems += [
            f"differs from its .proto (run `make protos`): libs/proto/{p}"
            for p in sorted(fresh & current)
            if not filecmp.cmp(Path(tmp) / p, GENERATED / p, shallow=False)
        ]
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"generated code is up to date ({len(fresh)} files)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
