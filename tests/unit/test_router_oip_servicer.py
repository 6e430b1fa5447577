"""The Open Inference Protocol servicer's converters: inference.* messages (the vendored Triton proto) to oip.py's
types and back."""
from __future__ import annotations

import grpc_service_pb2 as pb

from hotslot import errors
from hotslot.services.router import oip, oip_servicer


def test_a_request_keeps_its_tensors_raw_contents_parameters_and_asked_outputs():
    request = pb.ModelInferRequest(
        model_name="tiny-sd-0", model_version="2", id="r1",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="prompt", datatype="BYTES", shape=[1]),
                pb.ModelInferRequest.InferInputTensor(
                    name="seed", datatype="INT64", shape=[1], contents=pb.InferTensorContents(int64_contents=[7]))],
        raw_input_contents=[oip.encode_bytes_tensor([b"a boat"]), b""],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="image")],
    )
    for key, parameter in {"steps": pb.InferParameter(int64_param=4), "lora": pb.InferParameter(string_param="x"),
                           "progress": pb.InferParameter(bool_param=True),
                           "guidance_scale": pb.InferParameter(double_param=1.5),
                           "big": pb.InferParameter(uint64_param=2**64 - 1)}.items():
        request.parameters[key].CopyFrom(parameter)
    converted = oip_servicer.infer_request_from_proto(request)
    assert (converted.model_name, converted.model_version, converted.id, converted.outputs) == (
        "tiny-sd-0", "2", "r1", ("image",)
    )
    assert converted.inputs == (oip.InputTensor("prompt", "BYTES", (1,)),
                                oip.InputTensor("seed", "INT64", (1,), {"int64_contents": [7]}))
    assert converted.raw_contents == (oip.encode_bytes_tensor([b"a boat"]), b"")
    assert converted.parameters == {"steps": 4, "lora": "x", "progress": True, "guidance_scale": 1.5,
                                    "big": 2**64 - 1}


def test_an_outcome_becomes_a_response_with_raw_outputs_and_typed_parameters():
    outcome = oip.InferOutcome(
        "tiny-sd-0", "1", "r1", (oip.OutputTensor("image", "BYTES", (1,), b"\x00\x00\x00\x00"),),
        {"seed": 7, "tier": "active", "ok": True, "scale": 0.5},
    )
    response = oip_servicer.infer_response_to_proto(outcome)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("image", "BYTES", [1])]
    assert list(response.raw_output_contents) == [b"\x00\x00\x00\x00"]
    assert response.parameters["seed"].int64_param == 7
    assert response.parameters["tier"].string_param == "active"
    assert response.parameters["ok"].bool_param is True
    assert response.parameters["scale"].double_param == 0.5
    assert "triton_final_response" not in response.parameters  # only on streams


def test_stream_items_carry_triton_final_response_and_failures_their_status_name():
    progress = oip.InferOutcome("m", "", "1", parameters={"progress": "step"}, final=False)
    streamed = oip_servicer.stream_item_to_proto(progress)
    assert streamed.infer_response.parameters["triton_final_response"].bool_param is False
    failed = oip_servicer.stream_item_to_proto(oip.StreamFailure("m", "2", errors.NotFound("model 'm' is unknown")))
    assert failed.error_message == "NOT_FOUND: model 'm' is unknown"
    assert (failed.infer_response.model_name, failed.infer_response.id) == ("m", "2")


def test_model_metadata_lists_the_schema_tensors():
    response = oip_servicer.model_metadata_to_proto(oip.ModelMetadata("m", ("3",), "diffusers"))
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs][0] == ("prompt", "BYTES", [1])
    assert [t.name for t in response.outputs] == ["image"]
    assert list(response.versions) == ["3"]
