"""gRPC server reflection under both names clients use (grpc.reflection.v1 and v1alpha), serving the contracts with
their comments: `grpcurl describe` prints each RPC's documentation, status codes included.

grpcio-reflection serves v1alpha only and, with the upb protobuf runtime, sends descriptors without their
source info (FileDescriptor.CopyToProto drops it). So the contracts' descriptors are read from the
FileDescriptorSet that `make protos` writes with --include_source_info (libs/proto/hotslot/descriptor_set.binpb)
and sent as written; v1 is the same service under its new name (its messages are the v1alpha ones, field for field,
so one servicer answers both)."""
from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Iterable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2  # noqa: F401 - puts the error detail types in the default pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc

log = logging.getLogger(__name__)

DESCRIPTOR_SET = "descriptor_set.binpb"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
_V1_FILE = "grpc/reflection/v1/reflection.proto"
# The types every error's `grpc-status-details-bin` may carry (ErrorInfo, BadRequest, RetryInfo in a Status):
# grpcurl resolves an Any's type through reflection, so they are served too, or it prints undecoded bytes.
ERROR_DETAIL_TYPES = ("google.rpc.Status", "google.rpc.ErrorInfo")


def documented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with source info, of every contract and what it imports, from
    the descriptor set `make protos` writes; empty (with a warning) when it is missing."""
    resource = importlib.resources.files("hotslot").joinpath(DESCRIPTOR_SET)
    try:
        data = resource.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        log.warning("%s not found: reflection serves the contracts without their comments (run `make protos`)",
                    DESCRIPTOR_SET)
        return {}
    return {f.name: f.SerializeToString() for f in descriptor_pb2.FileDescriptorSet.FromString(data).file}


def _add_file(pool: descriptor_pool.DescriptorPool, file: FileDescriptor) -> None:
    """Adds `file` (from the default pool) and, first, its imports, unless the pool has them."""
    try:
        pool.FindFileByName(file.name)
        return
    except KeyError:
        pass
    for dependency in file.dependencies:
        _add_file(pool, dependency)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    pool.Add(proto)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: the v1alpha file under the v1 package (the two are the same messages and
    service; v1 only renamed the package), so `describe grpc.reflection.v1.ServerReflection` works too."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    return proto


def reflection_pool(service_names: Iterable[str], documented: dict[str, bytes]) -> descriptor_pool.DescriptorPool:
    """A pool of the documented contracts, plus the file of every served service they lack (health, reflection,
    anything registered from generated code only), taken from the default pool."""
    pool = descriptor_pool.DescriptorPool()
    pending = dict(documented)

    def add_documented(name: str) -> None:
        proto = descriptor_pb2.FileDescriptorProto.FromString(pending.pop(name))
        for dependency in proto.dependency:
            if dependency in pending:
                add_documented(dependency)
        pool.Add(proto)

    while pending:
        add_documented(next(iter(pending)))
    pool.Add(_v1_file())
    default = descriptor_pool.Default()
    for name in (*service_names, *ERROR_DETAIL_TYPES):
        try:
            pool.FindFileContainingSymbol(name)
        except KeyError:
            try:
                _add_file(pool, default.FindFileContainingSymbol(name))
            except KeyError:
                log.warning("reflection: no descriptor for service %s; clients cannot describe it", name)
    return pool


class DocumentedReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's servicer, sending each file of the descriptor set as written (with its comments)
    instead of the pool's copy without them."""

    def __init__(self, service_names: Iterable[str], documented: dict[str, bytes]) -> None:
        names = tuple(service_names)
        pool = reflection_pool(names, documented)
        super().__init__(names, pool=pool)
        self._documented = documented
        self._lookup_pool = pool

    def _upstream(self) -> Any:
        """grpcio-reflection's servicer, whose methods overridden here are private (typeshed does not list them)."""
        return super()

    def _with_comments(self, response: v1alpha_pb2.ServerReflectionResponse) -> v1alpha_pb2.ServerReflectionResponse:
        if response.HasField("file_descriptor_response"):
            files = response.file_descriptor_response.file_descriptor_proto
            for i, raw in enumerate(files):
                documented = self._documented.get(descriptor_pb2.FileDescriptorProto.FromString(raw).name)
                if documented is not None:
                    files[i] = documented
        return response

    def _file_by_filename(
        self, request: v1alpha_pb2.ServerReflectionRequest, filename: str
    ) -> v1alpha_pb2.ServerReflectionResponse:
        return self._with_comments(self._upstream()._file_by_filename(request, filename))

    def _file_containing_symbol(
        self, request: v1alpha_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> v1alpha_pb2.ServerReflectionResponse:
        response = self._upstream()._file_containing_symbol(request, fully_qualified_name)
        if response.HasField("error_response"):
            # The upb pool finds services and messages but not methods: `grpcurl describe pkg.Service.Method`
            # asks for the method, which lives in its service's file.
            service, _, method = fully_qualified_name.rpartition(".")
            try:
                found = method in self._lookup_pool.FindServiceByName(service).methods_by_name
            except KeyError:
                found = False
            if found:
                response = self._upstream()._file_containing_symbol(request, service)
        return self._with_comments(response)

    def _file_containing_extension(
        self, request: v1alpha_pb2.ServerReflectionRequest, containing_type: str, extension_number: int
    ) -> v1alpha_pb2.ServerReflectionResponse:
        return self._with_comments(
            self._upstream()._file_containing_extension(request, containing_type, extension_number)
        )


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection of `service_names` (and of reflection itself, both versions) on `server`."""
    names = [*service_names, *SERVICE_NAMES]
    servicer = DocumentedReflectionServicer(names, documented_files())
    v1alpha_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    # v1 on the wire is v1alpha under another service name, so the same handler (and message classes) serve it.
    v1_handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1_handler}),)
    )
