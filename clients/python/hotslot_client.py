"""A hotslot client in Python with the generated stubs (libs/proto, or `make protos` output): Generate,
GenerateStream, Evict, and the google.rpc error details (ErrorInfo, BadRequest, RetryInfo) of a failed call.
README.md ("Clients") shows it; tests/integration/test_clients.py runs it against a real cluster.

    python clients/python/hotslot_client.py ROUTER_ADDRESS MODEL_ID

Prints one JSON object per line, as the Node.js client does."""
from __future__ import annotations

import json
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hotslot.common.v1 import common_pb2
from hotslot.router.v1 import router_service_pb2 as pb
from hotslot.router.v1 import router_service_pb2_grpc as pb_grpc


def error_details(error: grpc.RpcError) -> dict[str, object]:
    """The google.rpc details of a failed call, by type name (ErrorInfo, BadRequest, RetryInfo)."""
    status = rpc_status.from_call(error)  # decodes the grpc-status-details-bin trailer
    found: dict[str, object] = {}
    for detail in status.details if status else ():
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            message = kind()
            if detail.Unpack(message):
                found[kind.DESCRIPTOR.name] = message
    return found


def main(address: str, model_id: str) -> None:
    with grpc.insecure_channel(address) as channel:
        router = pb_grpc.RouterServiceStub(channel)

        # Generate: unset optional fields (seed, guidance_scale) mean "random" and "the executor's default".
        reply = router.Generate(pb.GenerateRequest(
            model=common_pb2.ModelRef(model_id=model_id),
            params=common_pb2.GenerationParams(prompt="a lighthouse at dusk", steps=2, seed=7, guidance_scale=0.0),
        ), timeout=300)
        image = reply.images[0]
        print(json.dumps({
            "call": "Generate", "executor_id": reply.executor_id, "tier": common_pb2.Tier.Name(reply.tier),
            "placement_reason": pb.PlacementReason.Name(reply.placement_reason), "seed": image.seed,
            "png": image.data[1:4] == b"PNG", "width": image.width,
        }))

        # GenerateStream: load progress, one message per denoising step, then the result.
        events = {"load": 0, "step": 0, "result": 0}
        for message in router.GenerateStream(pb.GenerateStreamRequest(
            model=common_pb2.ModelRef(model_id=model_id),
            params=common_pb2.GenerationParams(prompt="a red boat", steps=3),
        ), timeout=300):
            kind = message.WhichOneof("event")
            events[kind] += 1
            if kind == "result":
                streamed = message.result
        print(json.dumps({"call": "GenerateStream", "events": events, "seed": streamed.images[0].seed}))

        # A bad request: INVALID_ARGUMENT with ErrorInfo (the reason to branch on) and BadRequest (the fields).
        try:
            router.Generate(pb.GenerateRequest(
                model=common_pb2.ModelRef(model_id=model_id),
                params=common_pb2.GenerationParams(prompt="x", steps=100000),
            ), timeout=60)
        except grpc.RpcError as error:
            details = error_details(error)
            print(json.dumps({
                "call": "error", "code": error.code().name, "message": error.details(),
                "reason": details["ErrorInfo"].reason, "domain": details["ErrorInfo"].domain,
                "fields": [v.field for v in details["BadRequest"].field_violations],
            }))

        # Evict: every executor holding the model answers.
        evicted = router.Evict(pb.EvictRequest(model=common_pb2.ModelRef(model_id=model_id)), timeout=60)
        print(json.dumps({"call": "Evict", "results": [
            {"executor_id": r.executor_id, "outcome": pb.EvictOutcome.Name(r.outcome), "freed_bytes": r.freed_bytes}
            for r in evicted.results
        ]}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
