"""Verified reads through real processes: a cached blob flipped on the node's disk is caught while the executor
reads it, reported to the storage-cache (which drops it) and fetched again from the share, so the client still
gets the right image; with the share's file corrupted too the load ends in DATA_LOSS naming the file; with
`--no-verify-reads` nothing is checked."""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from hotslot import checksum
from hotslot.common.v1 import common_pb2
from hotslot.executor.v1 import executor_service_pb2 as epb
from hotslot.storage.v1 import storage_cache_service_pb2 as spb
from hotslot.storage.v1 import storage_cache_service_pb2_grpc as sgrpc
from tests.support.stack import Stack, executor_stub, generate_request, start_stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not checksum.available(), reason="xxhash is not installed"),
]

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_family: list[Path]):
    s = start_stack(tmp_path_factory.mktemp("verify-stack"), tiny_family)
    probe = s.root / "cache" / "xattr-probe"
    probe.write_bytes(b"")
    if not checksum.record(probe, 1):
        s.stop()
        pytest.skip(f"the filesystem of {probe.parent} keeps no user xattrs")
    yield s
    s.stop()


def _unet_sha256(stack: Stack, model_id: str) -> str:
    with grpc.insecure_channel(stack.storage.address) as channel:
        reply = sgrpc.StorageCacheServiceStub(channel).EnsureModel(
            spb.EnsureModelRequest(model=common_pb2.ModelRef(model_id=model_id)), timeout=60)
    return next(f.sha256 for f in reply.files if f.path == UNET)


def _flip(path: Path, offset_from_end: int = 100) -> None:
    """Changes one byte in place (same inode, so the recorded checksum stays): what a failing disk does."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte ^ 0x55]))


def _blob(stack: Stack, sha256: str) -> Path:
    return stack.root / "cache" / "blobs" / "sha256" / sha256[:2] / sha256


def _generate_fresh(stub, model_id: str):
    """Generates after evicting the model, so its files are read from the node's cache again."""
    stub.Evict(epb.EvictRequest(model=common_pb2.ModelRef(model_id=model_id)), timeout=60)
    return stub.Generate(generate_request(model_id, seed=5), timeout=180)


@pytest.fixture(scope="module")
def verifying(stack: Stack):
    svc = stack.start_executor("--no-lookahead", name="verifying")
    with grpc.insecure_channel(svc.address) as channel:
        yield svc, executor_stub(channel)


def test_a_corrupted_cached_blob_is_caught_while_reading_and_fetched_again(stack: Stack, verifying) -> None:
    svc, stub = verifying
    reference = stub.Generate(generate_request("tiny-sd-0", seed=5), timeout=180).images[0].data
    digest = _unet_sha256(stack, "tiny-sd-0")
    _flip(_blob(stack, digest))

    again = _generate_fresh(stub, "tiny-sd-0")

    assert again.images[0].data == reference
    assert "failed its read checksum" in svc.log()
    storage_log = stack.storage.log()
    assert "a reader reported a corrupt blob" in storage_log and "dropped corrupt blob" in storage_log
    assert digest in storage_log
    assert _blob(stack, digest).exists()  # fetched again, whole
    with open(_blob(stack, digest), "rb") as blob:
        assert checksum.of_file(blob.fileno()) == checksum.read_recorded(blob.fileno())


def test_a_corrupted_blob_whose_share_file_is_corrupted_too_ends_in_data_loss_naming_the_file(
    stack: Stack, verifying
) -> None:
    _, stub = verifying
    stub.Generate(generate_request("tiny-sd-1", seed=5), timeout=180)
    digest = _unet_sha256(stack, "tiny-sd-1")
    _flip(_blob(stack, digest))
    _flip(stack.share / "models" / "tiny-sd-1" / UNET)

    with pytest.raises(grpc.RpcError) as caught:
        _generate_fresh(stub, "tiny-sd-1")

    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert UNET in caught.value.details()
    # the executor still serves the models whose files are intact
    assert stub.Generate(generate_request("tiny-sd-0", seed=5), timeout=180).images


def test_with_verify_reads_off_nothing_is_checked(stack: Stack) -> None:
    svc = stack.start_executor("--no-lookahead", "--no-verify-reads", name="trusting")
    with grpc.insecure_channel(svc.address) as channel:
        stub = executor_stub(channel)
        stub.Generate(generate_request("tiny-sd-2", seed=5), timeout=180)
        digest = _unet_sha256(stack, "tiny-sd-2")
        _flip(_blob(stack, digest))
        assert _generate_fresh(stub, "tiny-sd-2").images  # read as it is: the node trusts its disk
    assert "failed its read checksum" not in svc.log()
    assert digest not in stack.storage.log()
