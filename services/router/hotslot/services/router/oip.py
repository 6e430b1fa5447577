"""The Open Inference Protocol (KServe v2, with Triton's model-repository extension) in hotslot's terms: text to
image as tensors and parameters, the schema ModelMetadata reports, and the tensors' raw encodings. No transport
code and no router: oip_frontend.py answers the protocol's calls with the router core, and oip_servicer.py converts
the `inference.*` protobuf messages to the types here and back.

Schema of every model (a LoRA adapter too: it runs on its base with scale 1.0):

    inputs   prompt          BYTES  [1]  required  UTF-8 text of the image to generate
             negative_prompt BYTES  [1]  optional  UTF-8 text of what to keep out; empty for none
             seed            INT64  [1]  optional  0 to 2^63-1; the same seed and inputs give the same image
             steps           INT32  [1]  optional  denoising steps; absent or 0: the executor's default
             guidance_scale  FP32   [1]  optional  classifier-free guidance; absent: the executor's default
             width, height   INT32  [1]  optional  pixels, multiples of 8; absent or 0: the executor's default
    output   image           BYTES  [1]            the PNG file, in raw_output_contents as Triton sends it

Each input may come as an input tensor (its values in `contents` or in `raw_input_contents`, as tritonclient sends
them) or as a request parameter of the same name, not both. A scalar is any shape with one element ([1], [1, 1]).
Integer inputs take any integer datatype, guidance_scale any number. Request parameters beyond the inputs:
`lora` (string "adapter[:scale][,adapter[:scale]...]", adapters applied on the model, in order) and `progress`
(bool, ModelStreamInfer only: a response per load phase and denoising step before the image).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hotslot.errors import HotslotError, InvalidArgument

SERVER_NAME = "hotslot"
EXTENSIONS = ("model_repository", "parameters")
"""Triton extension names this front-end supports (ServerMetadata)."""

PLATFORM_PIPELINE = "diffusers"
PLATFORM_LORA = "diffusers_lora"

ParamValue = bool | int | float | str
"""A request parameter's value, whichever of InferParameter's fields carried it."""

MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1

# Parameters clients set for the protocol itself (tritonclient's reserved names and prefix): never ours to refuse.
_PROTOCOL_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers", "binary_data_output"}
)
_PROTOCOL_PREFIX = "triton_"

_INTEGER_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
_NUMBER_TYPES = (*_INTEGER_TYPES, "FP16", "FP32", "FP64")

# Little-endian element layout of raw_input_contents per datatype (BYTES: a 4-byte length before each element).
_RAW_FORMATS = {
    "BOOL": "?", "INT8": "b", "UINT8": "B", "INT16": "h", "UINT16": "H", "FP16": "e", "INT32": "i", "UINT32": "I",
    "FP32": "f", "INT64": "q", "UINT64": "Q", "FP64": "d",
}
# The InferTensorContents field that carries each datatype (FP16 has none: raw only).
_CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the schema."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    required: bool
    description: str
    accepts: tuple[str, ...] = ()
    """Datatypes taken besides `datatype`."""


INPUTS = (
    TensorSpec("prompt", "BYTES", (1,), True, "UTF-8 text of the image to generate"),
    TensorSpec("negative_prompt", "BYTES", (1,), False, "UTF-8 text of what to keep out; empty for none"),
    TensorSpec("seed", "INT64", (1,), False, "0 to 2^63-1; the same seed and inputs give the same image",
               _INTEGER_TYPES),
    TensorSpec("steps", "INT32", (1,), False, "denoising steps; absent or 0: the executor's default", _INTEGER_TYPES),
    TensorSpec("guidance_scale", "FP32", (1,), False, "classifier-free guidance scale; absent: the executor's default",
               _NUMBER_TYPES),
    TensorSpec("width", "INT32", (1,), False, "pixels, a multiple of 8; absent or 0: the executor's default",
               _INTEGER_TYPES),
    TensorSpec("height", "INT32", (1,), False, "pixels, a multiple of 8; absent or 0: the executor's default",
               _INTEGER_TYPES),
)
OUTPUTS = (TensorSpec("image", "BYTES", (1,), True, "the PNG file"),)
IMAGE = OUTPUTS[0].name
_INPUTS_BY_NAME = {spec.name: spec for spec in INPUTS}
EXTRA_PARAMETERS = ("lora", "progress")
"""Request parameters that are not inputs."""


# -- the protocol's messages as domain types ----------------------------------------------------------------------
@dataclass(frozen=True)
class InputTensor:
    """One entry of ModelInferRequest.inputs. `contents` holds InferTensorContents' non-empty fields by name
    (e.g. {"int64_contents": [7]}); the raw bytes, if the client sent them, are in InferRequest.raw_contents."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    contents: Mapping[str, Sequence[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: tuple[InputTensor, ...] = ()
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    raw_contents: tuple[bytes, ...] = ()
    """raw_input_contents: none, or one per input, in the order of `inputs`."""
    outputs: tuple[str, ...] = ()
    """Names of the outputs asked for; empty for all."""


@dataclass(frozen=True)
class TextToImage:
    """What a request asks for, parsed and checked for type and shape. None: not given (the executor's default).
    Bounds (steps, size, guidance range) are the executor's to check: it answers INVALID_ARGUMENT naming them."""

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    adapters: tuple[tuple[str, float | None], ...] = ()
    """LoRA adapters (model id, scale or None for 1.0), applied in this order."""
    progress: bool = False


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes
    """The tensor's bytes as raw_output_contents carries them."""


@dataclass(frozen=True)
class InferOutcome:
    """A ModelInferResponse: the image, or (`outputs` empty) a progress update of ModelStreamInfer."""

    model_name: str
    model_version: str
    id: str
    outputs: tuple[OutputTensor, ...] = ()
    parameters: Mapping[str, ParamValue] = field(default_factory=dict)
    final: bool = True
    """False for progress updates: a stream's response for this request follows."""


@dataclass(frozen=True)
class StreamFailure:
    """A request of ModelStreamInfer that failed: sent as the stream's error_message; the stream goes on."""

    model_name: str
    id: str
    error: HotslotError


StreamItem = InferOutcome | StreamFailure


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...] = INPUTS
    outputs: tuple[TensorSpec, ...] = OUTPUTS


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    state: str
    """READY where some executor holds the model (active, standby or host memory), else UNAVAILABLE."""
    reason: str = ""


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...] = EXTENSIONS


# -- parsing -----------------------------------------------------------------------------------------------------
def parse_version(version: str) -> int:
    """A model_version as a registry revision: "" is the latest (0), else a positive integer."""
    if not version:
        return 0
    if version.isdigit() and int(version) > 0:
        return int(version)
    raise InvalidArgument.field(
        "model_version", f"{version!r} is not a revision: give none (the latest) or a number such as \"2\""
    )


def require_model_name(name: str) -> str:
    if not name:
        raise InvalidArgument.field("model_name", "is required")
    return name


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def decode_bytes_tensor(raw: bytes, name: str) -> list[bytes]:
    """Elements of a BYTES tensor in raw form: each is a 4-byte little-endian length and that many bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _bad_input(name, "raw BYTES content is truncated (an element's 4-byte length is cut short)")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _bad_input(name, f"raw BYTES content is truncated (an element of {length} bytes runs past the end)")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def encode_bytes_tensor(elements: Iterable[bytes]) -> bytes:
    """The raw form of a BYTES tensor (see decode_bytes_tensor)."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def tensor_values(tensor: InputTensor, raw: bytes | None) -> list[Any]:
    """The tensor's elements as Python values (bytes for BYTES), from its raw bytes if any, else its contents;
    their number must match the shape."""
    datatype = tensor.datatype
    if datatype not in _CONTENTS_FIELDS and datatype != "FP16":
        raise _bad_input(tensor.name, f"unknown datatype {datatype!r}")
    if any(dim < 0 for dim in tensor.shape):
        raise _bad_input(tensor.name, f"shape {list(tensor.shape)} has a negative dimension")
    count = element_count(tensor.shape)
    if raw is not None:
        if datatype == "BYTES":
            values: list[Any] = decode_bytes_tensor(raw, tensor.name)
        else:
            fmt = _RAW_FORMATS[datatype]
            size = struct.calcsize(fmt)
            if len(raw) != count * size:
                raise _bad_input(tensor.name, f"raw content has {len(raw)} bytes; shape {list(tensor.shape)} of "
                                 f"{datatype} needs {count * size}")
            values = list(struct.unpack(f"<{count}{fmt}", raw))
    else:
        field_name = _CONTENTS_FIELDS.get(datatype, "")
        values = list(tensor.contents.get(field_name, ()))
        others = sorted(name for name, items in tensor.contents.items() if name != field_name and len(items))
        if others:
            raise _bad_input(tensor.name, f"datatype {datatype} is carried in {field_name or 'raw_input_contents'}, "
                             f"not {', '.join(others)}")
    if len(values) != count:
        raise _bad_input(tensor.name, f"has {len(values)} elements; shape {list(tensor.shape)} needs {count}")
    return values


def parse_text_to_image(request: InferRequest, *, streaming: bool = False) -> TextToImage:
    """Reads the schema's inputs from the request's tensors and parameters. Raises InvalidArgument naming the
    input (or parameter) and what is wrong: missing prompt, unknown name, wrong datatype or shape, a value out of
    its type's range, an input given twice."""
    if request.raw_contents and len(request.raw_contents) != len(request.inputs):
        raise InvalidArgument.field(
            "raw_input_contents",
            f"has {len(request.raw_contents)} entries for {len(request.inputs)} inputs; give one per input or none",
        )
    for name in request.outputs:
        if name != IMAGE:
            raise InvalidArgument.field("outputs", f"unknown output {name!r}; the one output is {IMAGE!r}")
    given: dict[str, Any] = {}
    for index, tensor in enumerate(request.inputs):
        spec = _INPUTS_BY_NAME.get(tensor.name)
        if spec is None:
            raise _bad_input(tensor.name, f"is not an input of this model; inputs are {_names(INPUTS)}")
        if tensor.name in given:
            raise _bad_input(tensor.name, "is given twice")
        if tensor.datatype != spec.datatype and tensor.datatype not in spec.accepts:
            raise _bad_input(tensor.name, f"datatype {tensor.datatype} is not accepted; it is {spec.datatype}"
                             + (f" (or {', '.join(t for t in spec.accepts if t != spec.datatype)})"
                                if spec.accepts else ""))
        values = tensor_values(tensor, request.raw_contents[index] if request.raw_contents else None)
        if len(values) != 1:
            raise _bad_input(tensor.name, f"shape {list(tensor.shape)} has {len(values)} elements; one is expected "
                             "(shape [1])")
        given[tensor.name] = _scalar(spec, values[0], where=f"input {tensor.name!r}")
    extras: dict[str, ParamValue] = {}
    for name, value in request.parameters.items():
        if name in _PROTOCOL_PARAMETERS or name.startswith(_PROTOCOL_PREFIX):
            continue
        spec = _INPUTS_BY_NAME.get(name)
        if spec is not None:
            if name in given:
                raise InvalidArgument.field(
                    f"parameters.{name}", "is given both as an input tensor and as a parameter; give one"
                )
            given[name] = _scalar(spec, value, where=f"parameter {name!r}")
        elif name in EXTRA_PARAMETERS:
            extras[name] = value
        else:
            raise InvalidArgument.field(
                f"parameters.{name}",
                f"is not a parameter of this model; parameters are the inputs ({_names(INPUTS)}) and "
                f"{', '.join(EXTRA_PARAMETERS)}",
            )
    if "prompt" not in given:
        raise InvalidArgument.field(
            "inputs.prompt", "is required: a BYTES input tensor of shape [1] (or a string parameter \"prompt\")"
        )
    progress = extras.get("progress", False)
    if not isinstance(progress, bool):
        raise InvalidArgument.field("parameters.progress", f"must be a bool, got {type_name(progress)}")
    if progress and not streaming:
        raise InvalidArgument.field("parameters.progress", "is for ModelStreamInfer; ModelInfer answers once")
    return TextToImage(
        prompt=given["prompt"],
        negative_prompt=given.get("negative_prompt", ""),
        seed=given.get("seed"),
        steps=given.get("steps"),
        guidance_scale=given.get("guidance_scale"),
        width=given.get("width"),
        height=given.get("height"),
        adapters=parse_adapters(extras["lora"]) if "lora" in extras else (),
        progress=progress,
    )


def parse_adapters(value: ParamValue) -> tuple[tuple[str, float | None], ...]:
    """The `lora` parameter: "adapter[:scale]" items separated by commas."""
    if not isinstance(value, str):
        raise InvalidArgument.field("parameters.lora", f"must be a string, got {type_name(value)}")
    adapters: list[tuple[str, float | None]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        model_id, _, scale_text = item.partition(":")
        scale = None
        if scale_text:
            try:
                scale = float(scale_text)
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                raise InvalidArgument.field("parameters.lora", f"scale {scale_text!r} of {model_id!r} is not a number")
        adapters.append((model_id.strip(), scale))
    if not adapters:
        raise InvalidArgument.field("parameters.lora", "names no adapter; give \"adapter[:scale],...\"")
    return tuple(adapters)


def _scalar(spec: TensorSpec, value: Any, *, where: str) -> Any:
    field_name = f"parameters.{spec.name}" if where.startswith("parameter") else f"inputs.{spec.name}"
    if spec.datatype == "BYTES":
        if isinstance(value, str):
            return value
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument.field(field_name, "is not valid UTF-8 text") from None
        raise InvalidArgument.field(field_name, f"must be text, got {type_name(value)}")
    if spec.datatype == "FP32":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument.field(field_name, f"must be a number, got {type_name(value)}")
        if not math.isfinite(value):
            raise InvalidArgument.field(field_name, f"must be a finite number, got {value}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument.field(field_name, f"must be an integer, got {type_name(value)}")
    if spec.name == "seed":
        if not 0 <= value <= MAX_SEED:
            raise InvalidArgument.field(field_name, f"must be 0 to {MAX_SEED}, got {value}")
    elif not 0 <= value <= MAX_INT32:
        raise InvalidArgument.field(field_name, f"must be 0 to {MAX_INT32}, got {value}")
    return value


def _bad_input(name: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(f"inputs.{name}", description)


def _names(specs: Iterable[TensorSpec]) -> str:
    return ", ".join(spec.name for spec in specs)


def type_name(value: Any) -> str:
    return {bool: "a bool", int: "an integer", float: "a number", str: "a string", bytes: "bytes"}.get(
        type(value), type(value).__name__
    )
