"""The Open Inference Protocol on the router, spoken by the real `tritonclient` (gRPC) against a real cluster:
registry, storage-cache, an executor with tiny pipelines, and the router, as separate processes. Runs the README's
tritonclient example as written, then checks the repository calls, readiness, inference, streaming with progress,
and the errors a Triton user sees for an unknown model and a bad input."""
from __future__ import annotations

import base64
import io
import json
import queue
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc_service_pb2 as oip_pb
import grpc_service_pb2_grpc as oip_grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from hotslot.common.v1 import common_pb2
from hotslot.modelgen.lora import write_lora
from hotslot.registry.v1 import registry_service_pb2 as rpb
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc
from tests.support.stack import Stack, running_cluster
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("oip")
    with running_cluster(root, tiny_family[:2], executors=1) as stack:
        adapter = write_lora(root / "made" / "tiny-lora-a", tiny_family[0], seed=1)
        shutil.copytree(adapter, stack.share / "loras" / "tiny-lora-a")
        with grpc.insecure_channel(stack.registry.address) as channel:
            rgrpc.RegistryServiceStub(channel).RegisterModel(rpb.RegisterModelRequest(
                model_id="tiny-lora-a", kind=common_pb2.MODEL_KIND_LORA_ADAPTER, base_model_id="tiny-sd-0",
                source="loras/tiny-lora-a"), timeout=60)
        yield stack


@pytest.fixture
def client(cluster: Stack) -> Iterator[grpcclient.InferenceServerClient]:
    assert cluster.router is not None
    client = grpcclient.InferenceServerClient(cluster.router.address)
    try:
        wait_for(client.is_server_ready, "the router to see a ready executor")
        yield client
    finally:
        client.close()


def bytes_input(name: str, value: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
    return tensor


def int_input(name: str, value: int, datatype: str = "INT32") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(np.array([value], dtype=np.int32 if datatype == "INT32" else np.int64))
    return tensor


def readme_example() -> str:
    section = README.read_text().split("## Open Inference Protocol (KServe v2 / Triton clients)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_tritonclient_example_runs_as_written(cluster: Stack, client, capsys):
    assert cluster.router is not None
    namespace: dict = {}
    exec(compile(readme_example().replace("localhost:50050", cluster.router.address), "README.md", "exec"),
         namespace)
    out = capsys.readouterr().out
    assert "('tiny-sd-0', " in out and "('tiny-sd-1', " in out
    assert namespace["image"].size == (64, 48)
    assert namespace["image"].format == "PNG"
    assert namespace["final"].size == (64, 64)  # the executor's default size in this stack
    assert "step 4 of 4" in out
    assert not client.is_model_ready("tiny-sd-0")


def test_loading_makes_a_model_ready_and_listed_ready_and_unloading_undoes_it(cluster: Stack, client):
    assert cluster.router is not None
    def states() -> dict[str, str]:
        return {m.name: m.state for m in client.get_model_repository_index().models}

    assert states() == {"tiny-lora-a": "UNAVAILABLE", "tiny-sd-0": "UNAVAILABLE", "tiny-sd-1": "UNAVAILABLE"}
    assert not client.is_model_ready("tiny-sd-1")
    client.load_model("tiny-sd-1")
    assert client.is_model_ready("tiny-sd-1")
    assert client.is_model_ready("tiny-sd-1", model_version="1")
    assert states() == {"tiny-lora-a": "UNAVAILABLE", "tiny-sd-0": "UNAVAILABLE", "tiny-sd-1": "READY"}
    # tritonclient has no `ready` argument: the generated stub of the vendored proto sends it.
    with grpc.insecure_channel(cluster.router.address) as channel:
        ready = oip_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            oip_pb.RepositoryIndexRequest(ready=True), timeout=30
        )
    assert [(m.name, m.version, m.state) for m in ready.models] == [("tiny-sd-1", "1", "READY")]
    client.unload_model("tiny-sd-1")
    assert not client.is_model_ready("tiny-sd-1")
    assert states()["tiny-sd-1"] == "UNAVAILABLE"


def test_server_and_model_metadata_describe_the_text_to_image_schema(client):
    server = client.get_server_metadata()
    assert server.name == "hotslot" and "model_repository" in server.extensions
    metadata = client.get_model_metadata("tiny-sd-0")
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("tiny-sd-0", ["1"], "diffusers")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("prompt", "BYTES", [1]), ("negative_prompt", "BYTES", [1]), ("seed", "INT64", [1]), ("steps", "INT32", [1]),
        ("guidance_scale", "FP32", [1]), ("width", "INT32", [1]), ("height", "INT32", [1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("image", "BYTES", [1])]


def test_infer_returns_the_png_of_the_requested_size_and_the_same_seed_gives_the_same_image(client):
    inputs = [bytes_input("prompt", "a red boat"), int_input("steps", 2), int_input("seed", 11, "INT64"),
              int_input("width", 48), int_input("height", 32)]
    first = client.infer("tiny-sd-1", inputs, request_id="boat-1")
    again = client.infer("tiny-sd-1", inputs)
    png = first.as_numpy("image")[0]
    assert png.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(png)).size == (48, 32)
    assert again.as_numpy("image")[0] == png
    response = first.get_response()
    assert (response.id, response.model_name, response.model_version) == ("boat-1", "tiny-sd-1", "1")
    assert response.parameters["seed"].int64_param == 11
    assert response.parameters["executor_id"].string_param


def test_lora_adapters_apply_as_a_parameter_or_run_as_the_model(client):
    inputs = [bytes_input("prompt", "a red boat"), int_input("steps", 2), int_input("seed", 3, "INT64")]
    base = client.infer("tiny-sd-0", inputs)
    with_lora = client.infer("tiny-sd-0", inputs, parameters={"lora": "tiny-lora-a:0.5"})
    assert with_lora.get_response().parameters["lora"].string_param == "tiny-lora-a:0.5"
    assert "lora" not in base.get_response().parameters
    assert with_lora.as_numpy("image")[0] != base.as_numpy("image")[0]
    as_model = client.infer("tiny-lora-a", inputs)
    assert as_model.get_response().parameters["lora"].string_param == "tiny-lora-a:1"
    assert client.get_model_metadata("tiny-lora-a").platform == "diffusers_lora"
    with pytest.raises(InferenceServerException) as error:
        client.infer("tiny-sd-0", inputs, parameters={"lora": "no-such-adapter"})
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_an_unknown_model_is_not_found_and_not_ready(client):
    assert not client.is_model_ready("no-such-model")
    with pytest.raises(InferenceServerException) as error:
        client.infer("no-such-model", [bytes_input("prompt", "a")])
    assert error.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.get_model_metadata("no-such-model")
    assert error.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as error:
        client.load_model("no-such-model")
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_bad_inputs_are_invalid_argument_with_a_message_naming_the_input(client):
    cases = [
        ([int_input("steps", 2)], "inputs.prompt: is required"),
        ([int_input("prompt", 3)], "inputs.prompt: datatype INT32 is not accepted; it is BYTES"),
        ([bytes_input("prompt", "a"), bytes_input("steps", "4")], "inputs.steps: datatype BYTES is not accepted"),
        ([bytes_input("prompt", "a"), bytes_input("strength", "0.5")], "inputs.strength: is not an input"),
    ]
    for inputs, expected in cases:
        with pytest.raises(InferenceServerException) as error:
            client.infer("tiny-sd-0", inputs)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert expected in error.value.message()
    # The executor's own bounds come through the same way.
    with pytest.raises(InferenceServerException) as error:
        client.infer("tiny-sd-0", [bytes_input("prompt", "a"), int_input("width", 4000)])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "width" in error.value.message()
    assert client.is_server_live()


def test_a_stream_answers_a_failed_request_with_an_error_and_goes_on(client):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put(error or result))
    try:
        client.async_stream_infer("no-such-model", [bytes_input("prompt", "a")], request_id="bad")
        error = responses.get(timeout=120)
        assert isinstance(error, InferenceServerException)
        assert error.message().startswith("NOT_FOUND: ") and "no-such-model" in error.message()
        # Without `progress`, only the image comes back.
        client.async_stream_infer("tiny-sd-0", [bytes_input("prompt", "a"), int_input("steps", 2)], request_id="ok")
        result = responses.get(timeout=300)
        assert not isinstance(result, Exception), result
        assert result.get_response().id == "ok"
        assert result.get_response().parameters["triton_final_response"].bool_param
        assert result.as_numpy("image")[0].startswith(b"\x89PNG")
    finally:
        client.stop_stream()


def test_progress_streams_load_phases_and_every_step_before_the_image(client):
    client.unload_model("tiny-sd-0")
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put(error or result))
    seen = []
    try:
        client.async_stream_infer("tiny-sd-0", [bytes_input("prompt", "a"), int_input("steps", 3)],
                                  parameters={"progress": True})
        while True:
            response = responses.get(timeout=300)
            assert not isinstance(response, Exception), response
            parameters = response.get_response().parameters
            if parameters["triton_final_response"].bool_param:
                break
            if parameters["progress"].string_param == "step":
                seen.append(("step", parameters["step"].int64_param, parameters["total_steps"].int64_param))
            else:
                seen.append(("load", parameters["load_phase"].string_param))
    finally:
        client.stop_stream()
    assert response.as_numpy("image")[0].startswith(b"\x89PNG")
    steps = [s for s in seen if s[0] == "step"]
    assert steps == [("step", 1, 3), ("step", 2, 3), ("step", 3, 3)]
    loads = seen[:seen.index(steps[0])]
    # Unloaded first, so it was loaded again: its files were ensured before any step ran.
    assert ("load", "ensure") in loads and all(kind == "load" for kind, *_ in loads)


def test_reflection_lists_the_inference_service_beside_the_router_service(cluster: Stack):
    if GRPCURL is None:
        pytest.skip("grpcurl binary not installed")
    assert cluster.router is not None
    listed = subprocess.run([GRPCURL, "-plaintext", cluster.router.address, "list"], capture_output=True, text=True,
                            timeout=60, check=True).stdout.split()
    assert "inference.GRPCInferenceService" in listed
    assert "hotslot.router.v1.RouterService" in listed
    described = subprocess.run(
        [GRPCURL, "-plaintext", cluster.router.address, "describe", "inference.GRPCInferenceService"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse )" in described


def test_grpcurl_infers_with_parameters_only_as_the_readme_shows(cluster: Stack):
    if GRPCURL is None:
        pytest.skip("grpcurl binary not installed")
    assert cluster.router is not None
    body = ('{"model_name": "tiny-sd-0", "parameters": {"prompt": {"string_param": "a lighthouse"},'
            ' "steps": {"int64_param": 4}}}')
    answer = json.loads(subprocess.run(
        [GRPCURL, "-plaintext", "-d", body, cluster.router.address, "inference.GRPCInferenceService/ModelInfer"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout)
    assert answer["outputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["1"]}]
    raw = base64.b64decode(answer["rawOutputContents"][0])
    assert int.from_bytes(raw[:4], "little") == len(raw) - 4
    assert Image.open(io.BytesIO(raw[4:])).size == (64, 64)
