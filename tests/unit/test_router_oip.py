"""The Open Inference Protocol's domain side: tensors and parameters parsed into a text-to-image request, the raw
tensor encodings and the schema (router/oip.py), and what the router core is asked and answers becomes
(router/oip_frontend.py)."""
from __future__ import annotations

import struct

import pytest

from hotslot.common.v1 import common_pb2
from hotslot.errors import InvalidArgument
from hotslot.executor.v1 import executor_service_pb2 as epb
from hotslot.services.router import oip, oip_frontend
from hotslot.services.router.core import Routed
from hotslot.services.router.downstream import ProgressEvent
from hotslot.services.router.placement import HeldModel, PlacementReason, Tier


def text(name: str, value: str, *, raw: bool = True) -> tuple[oip.InputTensor, bytes | None]:
    data = value.encode()
    if raw:
        return oip.InputTensor(name, "BYTES", (1,)), oip.encode_bytes_tensor([data])
    return oip.InputTensor(name, "BYTES", (1,), {"bytes_contents": [data]}), None


def number(name: str, datatype: str, value, fmt: str) -> tuple[oip.InputTensor, bytes]:
    return oip.InputTensor(name, datatype, (1,)), struct.pack(f"<{fmt}", value)


def request(*tensors: tuple[oip.InputTensor, bytes | None], **parameters) -> oip.InferRequest:
    raws = [raw for _, raw in tensors]
    return oip.InferRequest(
        model_name="tiny-sd-0",
        inputs=tuple(tensor for tensor, _ in tensors),
        raw_contents=tuple(raws) if raws and all(raw is not None for raw in raws) else (),
        parameters=parameters,
    )


def violation(error: pytest.ExceptionInfo[InvalidArgument]) -> tuple[str, str]:
    return error.value.violations[0].field, error.value.violations[0].description


# -- raw encodings -------------------------------------------------------------------------------------------------
def test_bytes_tensors_round_trip_through_their_length_prefixed_raw_form():
    elements = [b"a lighthouse", b"", "ünïcode".encode()]
    raw = oip.encode_bytes_tensor(elements)
    assert raw[:4] == struct.pack("<I", 12)
    assert oip.decode_bytes_tensor(raw, "prompt") == elements


def test_a_truncated_raw_bytes_tensor_is_refused_naming_the_input():
    raw = oip.encode_bytes_tensor([b"a lighthouse"])[:-3]
    with pytest.raises(InvalidArgument) as error:
        oip.decode_bytes_tensor(raw, "prompt")
    assert violation(error)[0] == "inputs.prompt"
    assert "truncated" in error.value.message


def test_numeric_tensors_are_read_little_endian_from_raw_and_from_contents():
    tensor = oip.InputTensor("steps", "INT32", (1, 2))
    assert oip.tensor_values(tensor, struct.pack("<2i", 4, 8)) == [4, 8]
    tensor = oip.InputTensor("seed", "INT64", (1,), {"int64_contents": [7]})
    assert oip.tensor_values(tensor, None) == [7]


def test_raw_content_of_the_wrong_size_is_refused_with_the_sizes():
    with pytest.raises(InvalidArgument, match="has 8 bytes; shape \\[1\\] of INT32 needs 4"):
        oip.tensor_values(oip.InputTensor("steps", "INT32", (1,)), struct.pack("<q", 4))


def test_contents_in_the_field_of_another_datatype_are_refused():
    tensor = oip.InputTensor("steps", "INT32", (1,), {"int64_contents": [4]})
    with pytest.raises(InvalidArgument, match="carried in int_contents, not int64_contents"):
        oip.tensor_values(tensor, None)


# -- parsing ------------------------------------------------------------------------------------------------------
def test_every_input_is_read_from_raw_tensors_as_tritonclient_sends_them():
    parsed = oip.parse_text_to_image(request(
        text("prompt", "a lighthouse at dusk"),
        text("negative_prompt", "fog"),
        number("seed", "INT64", 7, "q"),
        number("steps", "INT32", 4, "i"),
        number("guidance_scale", "FP32", 0.0, "f"),
        number("width", "INT32", 64, "i"),
        number("height", "INT32", 32, "i"),
    ))
    assert parsed == oip.TextToImage(
        prompt="a lighthouse at dusk", negative_prompt="fog", seed=7, steps=4, guidance_scale=0.0, width=64,
        height=32,
    )


def test_inputs_may_come_as_request_parameters_and_absent_ones_stay_unset():
    parsed = oip.parse_text_to_image(oip.InferRequest(
        model_name="tiny-sd-0", parameters={"prompt": "a lighthouse", "steps": 3, "guidance_scale": 2}
    ))
    assert parsed == oip.TextToImage(prompt="a lighthouse", steps=3, guidance_scale=2.0)
    assert parsed.seed is None and parsed.width is None


def test_contents_tensors_and_any_integer_datatype_are_accepted():
    parsed = oip.parse_text_to_image(request(
        text("prompt", "a lighthouse", raw=False),
        (oip.InputTensor("steps", "INT64", (1, 1), {"int64_contents": [5]}), None),
        (oip.InputTensor("seed", "UINT64", (1,), {"uint64_contents": [2**63 - 1]}), None),
    ))
    assert (parsed.steps, parsed.seed) == (5, 2**63 - 1)


def test_a_request_without_a_prompt_is_refused_saying_how_to_give_one():
    with pytest.raises(InvalidArgument) as error:
        oip.parse_text_to_image(request(number("steps", "INT32", 4, "i")))
    field, description = violation(error)
    assert field == "inputs.prompt"
    assert "BYTES input tensor of shape [1]" in description


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (number("prompt", "INT32", 3, "i"), "datatype INT32 is not accepted; it is BYTES"),
        (number("steps", "FP32", 4.0, "f"), "datatype FP32 is not accepted; it is INT32"),
        ((oip.InputTensor("prompt", "BYTES", (2,)), oip.encode_bytes_tensor([b"a", b"b"])),
         "shape [2] has 2 elements; one is expected"),
        (number("seed", "INT64", -1, "q"), "must be 0 to 9223372036854775807, got -1"),
        (number("width", "INT64", 2**40, "q"), "must be 0 to 2147483647"),
        (number("guidance_scale", "FP32", float("nan"), "f"), "must be a finite number"),
        (number("strength", "FP32", 0.5, "f"), "is not an input of this model; inputs are prompt, negative_prompt"),
        ((oip.InputTensor("prompt", "BYTES", (1,)), oip.encode_bytes_tensor([b"\xff\xfe"])), "not valid UTF-8"),
    ],
)
def test_bad_inputs_are_refused_naming_the_input_and_the_problem(tensor, expected):
    tensors = [tensor] if tensor[0].name == "prompt" else [text("prompt", "a lighthouse"), tensor]
    with pytest.raises(InvalidArgument) as error:
        oip.parse_text_to_image(request(*tensors))
    assert violation(error)[0] == f"inputs.{tensor[0].name}"
    assert expected in error.value.message


def test_an_input_given_both_as_tensor_and_parameter_is_refused():
    with pytest.raises(InvalidArgument, match="both as an input tensor and as a parameter"):
        oip.parse_text_to_image(request(text("prompt", "a lighthouse"), prompt="another"))


def test_unknown_parameters_are_refused_but_the_protocols_own_are_ignored():
    parsed = oip.parse_text_to_image(request(text("prompt", "a"), priority=1, triton_enable_empty_final_response=True))
    assert parsed.prompt == "a"
    with pytest.raises(InvalidArgument) as error:
        oip.parse_text_to_image(request(text("prompt", "a"), step=4))
    assert violation(error)[0] == "parameters.step"
    assert "lora, progress" in error.value.message


def test_raw_contents_must_match_the_inputs_one_to_one():
    bad = oip.InferRequest("tiny-sd-0", inputs=(oip.InputTensor("prompt", "BYTES", (1,)),),
                           raw_contents=(b"", b""))
    with pytest.raises(InvalidArgument, match="2 entries for 1 inputs"):
        oip.parse_text_to_image(bad)


def test_only_the_image_output_may_be_asked_for():
    asked = oip.InferRequest("tiny-sd-0", parameters={"prompt": "a"}, outputs=("image",))
    assert oip.parse_text_to_image(asked).prompt == "a"
    with pytest.raises(InvalidArgument, match="unknown output 'latents'"):
        oip.parse_text_to_image(oip.InferRequest("tiny-sd-0", parameters={"prompt": "a"}, outputs=("latents",)))


def test_lora_parameter_lists_adapters_with_optional_scales_in_order():
    parsed = oip.parse_text_to_image(request(text("prompt", "a"), lora="tiny-lora-a:0.5, tiny-lora-k"))
    assert parsed.adapters == (("tiny-lora-a", 0.5), ("tiny-lora-k", None))
    with pytest.raises(InvalidArgument, match="scale 'x' of 'tiny-lora-a' is not a number"):
        oip.parse_text_to_image(request(text("prompt", "a"), lora="tiny-lora-a:x"))


def test_progress_is_a_stream_only_bool_parameter():
    assert oip.parse_text_to_image(request(text("prompt", "a"), progress=True), streaming=True).progress
    with pytest.raises(InvalidArgument, match="is for ModelStreamInfer"):
        oip.parse_text_to_image(request(text("prompt", "a"), progress=True))
    with pytest.raises(InvalidArgument, match="must be a bool"):
        oip.parse_text_to_image(request(text("prompt", "a"), progress="yes"), streaming=True)


@pytest.mark.parametrize(("version", "revision"), [("", 0), ("1", 1), ("12", 12)])
def test_model_versions_are_registry_revisions(version, revision):
    assert oip.parse_version(version) == revision


@pytest.mark.parametrize("version", ["0", "-1", "latest", "1.0"])
def test_a_version_that_is_no_revision_is_refused(version):
    with pytest.raises(InvalidArgument) as error:
        oip.parse_version(version)
    assert violation(error)[0] == "model_version"


# -- the core's inputs and outputs --------------------------------------------------------------------------------
def test_the_generate_call_sets_only_what_the_client_gave():
    call = oip_frontend.generate_call("tiny-sd-0", 2, oip.TextToImage(
        prompt="a", seed=0, guidance_scale=0.0, adapters=(("tiny-lora-a", 0.5), ("tiny-lora-k", None))
    ))
    assert (call.model_id, call.revision, call.request_id) == ("tiny-sd-0", 2, "")
    assert call.params.prompt == "a" and call.params.seed == 0 and call.params.steps == 0
    assert [(a.model.model_id, a.HasField("scale")) for a in call.adapters] == [
        ("tiny-lora-a", True), ("tiny-lora-k", False)
    ]
    assert call.adapters[0].scale == 0.5


def test_a_routed_result_becomes_the_png_as_raw_bytes_output_with_where_it_ran():
    result = epb.GenerateResponse(
        images=[common_pb2.Image(data=b"\x89PNG...", width=64, height=32, seed=7)],
        model=common_pb2.ModelRef(model_id="tiny-sd-0", revision=3),
        tier=common_pb2.TIER_STANDBY,
        executor_id="executor-1",
        request_id="abc",
    )
    asked = oip.InferRequest("tiny-sd-0", id="req-1", parameters={"prompt": "a"})
    outcome = oip_frontend.image_outcome(asked, Routed(result, ("executor-1",), PlacementReason.STANDBY, 0.0))
    assert (outcome.model_name, outcome.model_version, outcome.id, outcome.final) == ("tiny-sd-0", "3", "req-1", True)
    (image,) = outcome.outputs
    assert (image.name, image.datatype, image.shape) == ("image", "BYTES", (1,))
    assert oip.decode_bytes_tensor(image.raw, "image") == [b"\x89PNG..."]
    assert outcome.parameters == {
        "executor_id": "executor-1", "tier": "standby", "placement_reason": "standby", "hotslot_request_id": "abc",
        "seed": 7, "width": 64, "height": 32,
    }


def test_progress_events_become_parameters_of_a_response_with_no_outputs():
    asked = oip.InferRequest("tiny-sd-0", id="r")
    step = oip_frontend.progress_outcome(asked, ProgressEvent("step", epb.StepProgress(step=2, total_steps=4)))
    assert (step.outputs, step.final, dict(step.parameters)) == (
        (), False, {"progress": "step", "step": 2, "total_steps": 4}
    )
    load = oip_frontend.progress_outcome(asked, ProgressEvent("load", epb.LoadProgress(
        phase=common_pb2.LOAD_PHASE_READ, bytes_done=10, bytes_total=20
    )))
    assert load.parameters == {"progress": "load", "load_phase": "read", "bytes_done": 10, "bytes_total": 20,
                               "queue_position": 0}


def test_the_schema_lists_prompt_first_and_one_png_output():
    assert [(s.name, s.datatype, s.shape, s.required) for s in oip.INPUTS] == [
        ("prompt", "BYTES", (1,), True), ("negative_prompt", "BYTES", (1,), False), ("seed", "INT64", (1,), False),
        ("steps", "INT32", (1,), False), ("guidance_scale", "FP32", (1,), False), ("width", "INT32", (1,), False),
        ("height", "INT32", (1,), False),
    ]
    assert [(s.name, s.datatype, s.shape) for s in oip.OUTPUTS] == [("image", "BYTES", (1,))]


class _Snapshot:
    def __init__(self, models=(), adapters=()):
        self.models, self.adapters = tuple(models), tuple(adapters)


def test_a_model_counts_as_held_in_active_standby_or_host_memory_only():
    snapshot = _Snapshot(models=[HeldModel("a", 1, Tier.STANDBY), HeldModel("b", 1, Tier.LOCAL_DISK)],
                         adapters=[HeldModel("lora", 2, Tier.HOST)])
    assert oip_frontend.held_by(snapshot, "a", 0) and oip_frontend.held_by(snapshot, "a", 1)
    assert not oip_frontend.held_by(snapshot, "a", 2)
    assert not oip_frontend.held_by(snapshot, "b", 0)
    assert oip_frontend.held_by(snapshot, "lora", 0)
