"""`make demo` until the full cluster lands: writes a family of tiny models into a local share, starts the
model-registry as its own process, registers the family over gRPC and prints what the catalogue holds."""
from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hotslot.modelgen import write_family  # noqa: E402
from hotslot.registry.v1 import registry_service_pb2 as pb  # noqa: E402
from hotslot.registry.v1 import registry_service_pb2_grpc as pb_grpc  # noqa: E402
from tests.support.procs import start_service  # noqa: E402


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="hotslot-demo-"))
    share = state / "share"
    print(f"state directory: {state}")
    models = write_family(share / "tiny", 4, prefix="tiny-sd")
    print(f"wrote {len(models)} tiny pipelines under {share / 'tiny'}")
    registry = start_service(
        "registry", ["--models-root", str(share), "--database", str(state / "registry.db")],
        log_path=state / "registry.log",
    )
    print(f"registry listening on {registry.address} (log: {registry.log_path})")
    try:
        with grpc.insecure_channel(registry.address) as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            for model in models:
                stub.RegisterModel(
                    pb.RegisterModelRequest(model_id=model.name, source=f"tiny/{model.name}", labels={"demo": "1"})
                )
            listed = stub.ListModels(pb.ListModelsRequest(labels={"demo": "1"})).models
            print(f"\n{'model':<12} {'rev':>3} {'files':>5} {'bytes':>10}  manifest digest")
            for m in listed:
                print(f"{m.model_id:<12} {m.revision:>3} {len(m.manifest.files):>5} "
                      f"{m.manifest.total_bytes:>10}  {m.manifest.digest[:16]}")
            shared = set.intersection(*({(f.path, f.sha256) for f in m.manifest.files} for m in listed))
            print(f"\nfiles identical across all {len(listed)} models (stored once by storage-cache): {len(shared)}")
        print(f"\ntry: grpcurl -plaintext {registry.address} list   (Ctrl-C to stop)")
        try:
            signal.pause() if sys.stdin.isatty() else None
        except KeyboardInterrupt:
            pass
    finally:
        code = registry.stop()
        print(f"registry stopped (exit {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
