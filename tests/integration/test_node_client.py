"""The Node.js client of README "Clients" (clients/node/hotslot_client.mjs, @grpc/grpc-js + @grpc/proto-loader) run
with `node` against a real cluster: Generate, GenerateStream, and the google.rpc ErrorInfo and BadRequest of a bad
request decoded from the grpc-status-details-bin trailer."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.stack import running_cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
SCRIPT = ROOT / "clients" / "node" / "hotslot_client.mjs"


def test_node_client_generates_streams_and_decodes_error_details(
    tmp_path: Path, tiny_family: list[Path]
) -> None:
    assert NODE, "node is needed for the Node.js client test (README, Clients)"
    assert (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make install` (npm install)"
    with running_cluster(tmp_path, tiny_family[:1], executors=1) as stack:
        assert stack.router is not None
        done = subprocess.run([NODE, str(SCRIPT), stack.router.address, "tiny-sd-0"], capture_output=True,
                              text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    generated, streamed, bad, unknown = (json.loads(line) for line in done.stdout.splitlines())

    assert generated["call"] == "Generate" and generated["images"] == 1 and generated["png"]
    assert generated["seed"] == "7" and generated["width"] == 64  # uint64 arrives as a string (longs: String)
    assert generated["placement_reason"] == "PLACEMENT_REASON_LOAD" and generated["executor_id"]

    assert streamed["call"] == "GenerateStream" and streamed["images"] == 1
    assert streamed["events"]["step"] == 3 and streamed["events"]["result"] == 1 and streamed["events"]["load"] >= 1
    assert streamed["seed"] != "0", "an absent seed is drawn at random"

    assert (bad["code"], bad["reason"], bad["domain"]) == ("INVALID_ARGUMENT", "INVALID_PARAMETER", "hotslot.dev")
    assert bad["fields"] == ["params.steps"] and "params.steps" in bad["message"]
    assert (unknown["code"], unknown["reason"]) == ("NOT_FOUND", "MODEL_NOT_FOUND")
