"""gRPC adapter of the Open Inference Protocol (`inference.GRPCInferenceService`, vendored from Triton) on the
router: converts the protocol's messages to oip.py's types and back, nothing else. RPCs not overridden here
(ModelConfig, statistics, shared memory, trace and log settings) answer UNIMPLEMENTED from the generated base."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc_service_pb2 as pb
import grpc_service_pb2_grpc as pb_grpc

from hotslot.bootstrap.interceptors import status_code_of

from . import oip
from .oip_frontend import InferenceFrontend

SERVICE_FULL_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

_CONTENTS_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                    "fp32_contents", "fp64_contents", "bytes_contents")


# -- protocol -> domain ------------------------------------------------------------------------------------------
def parameter_value(parameter: pb.InferParameter) -> oip.ParamValue:
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which is not None else ""


def parameters_from_proto(parameters) -> dict[str, oip.ParamValue]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def input_tensor_from_proto(tensor: pb.ModelInferRequest.InferInputTensor) -> oip.InputTensor:
    contents = {name: list(getattr(tensor.contents, name)) for name in _CONTENTS_FIELDS
                if len(getattr(tensor.contents, name))}
    return oip.InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), contents)


def infer_request_from_proto(request: pb.ModelInferRequest) -> oip.InferRequest:
    return oip.InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=tuple(input_tensor_from_proto(tensor) for tensor in request.inputs),
        parameters=parameters_from_proto(request.parameters),
        raw_contents=tuple(request.raw_input_contents),
        outputs=tuple(output.name for output in request.outputs),
    )


# -- domain -> protocol ------------------------------------------------------------------------------------------
def parameter_to_proto(value: oip.ParamValue) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value) if value < 2**63 else pb.InferParameter(uint64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def infer_response_to_proto(outcome: oip.InferOutcome, *, streaming: bool = False) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=outcome.model_name,
        model_version=outcome.model_version,
        id=outcome.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape)
                 for o in outcome.outputs],
        raw_output_contents=[o.raw for o in outcome.outputs],
    )
    for key, value in outcome.parameters.items():
        response.parameters[key].CopyFrom(parameter_to_proto(value))
    if streaming:
        # Triton's marker for the last response of a request on a stream (decoupled models).
        response.parameters["triton_final_response"].bool_param = outcome.final
    return response


def stream_item_to_proto(item: oip.StreamItem) -> pb.ModelStreamInferResponse:
    if isinstance(item, oip.StreamFailure):
        return pb.ModelStreamInferResponse(
            error_message=f"{status_code_of(item.error).name}: {item.error.message}",
            infer_response=pb.ModelInferResponse(model_name=item.model_name, id=item.id),
        )
    return pb.ModelStreamInferResponse(infer_response=infer_response_to_proto(item, streaming=True))


def tensor_metadata(spec: oip.TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def model_metadata_to_proto(metadata: oip.ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=[tensor_metadata(spec) for spec in metadata.inputs],
        outputs=[tensor_metadata(spec) for spec in metadata.outputs],
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, frontend: InferenceFrontend) -> None:
        self.frontend = frontend

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.frontend.server_live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.frontend.server_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        metadata = self.frontend.server_metadata()
        return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=await self.frontend.model_ready(request.name, request.version))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        return model_metadata_to_proto(await self.frontend.model_metadata(request.name, request.version))

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        outcome = await self.frontend.infer(infer_request_from_proto(request), context.time_remaining())
        return infer_response_to_proto(outcome)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def requests() -> AsyncIterator[oip.InferRequest]:
            async for request in request_iterator:
                yield infer_request_from_proto(request)

        items = self.frontend.infer_stream(requests(), context.time_remaining)
        try:
            async for item in items:
                yield stream_item_to_proto(item)
        finally:
            await items.aclose()

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        # repository_name: hotslot has one repository (the registry), whatever it is called.
        entries = await self.frontend.repository_index(request.ready)
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in entries
        ])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context
    ) -> pb.RepositoryModelLoadResponse:
        await self.frontend.load(request.model_name, parameters_from_proto(request.parameters),
                                 context.time_remaining())
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.frontend.unload(request.model_name, context.time_remaining())
        return pb.RepositoryModelUnloadResponse()
