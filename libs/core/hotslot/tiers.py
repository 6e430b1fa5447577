"""The enums of `hotslot.common.v1` that the services compute with, defined once: the residency `Tier` of a model, the
`ExecutorState` and the `LoadPhase` of a load. Each member's value is the proto enum's value (so converting to and
from protobuf is `int(x)` / `Tier(value)`) and each name is the proto name without its prefix (`TIER_HOST` ->
`Tier.HOST`). Adding a value to the proto and running `make protos` without adding it here fails at import (and in
`tests/unit/test_tiers.py`): `_check_against_proto` compares the two name for name.

The executor's tier machine (which tier a model moves to from which) is `TRANSITIONS` in
`hotslot.services.executor.slots`; the router ranks tiers in `hotslot.services.router.placement`."""
from __future__ import annotations

import enum
from collections.abc import Mapping

from hotslot.common.v1 import common_pb2


class Tier(enum.IntEnum):
    """Residency tiers of a model, fastest first (hotslot.common.v1.Tier)."""

    UNSPECIFIED = 0
    ACTIVE = 1
    """The pipeline inference runs on, on the device."""
    STANDBY = 2
    """Fully materialized beside the active pipeline; promoting it is a pointer swap."""
    HOST = 3
    """Weights in host memory (shared memory; pinned on CUDA)."""
    LOCAL_DISK = 4
    """Files in the node-local disk cache."""
    BACKING_STORE = 5
    """Files only on the shared backing store (NFS)."""

    @property
    def label(self) -> str:
        """Lower-case name, as the CLI and the OIP frontend show it ("host", "local_disk")."""
        return self.name.lower()


class ExecutorState(enum.IntEnum):
    """Lifecycle of an executor (hotslot.common.v1.ExecutorState)."""

    UNSPECIFIED = 0
    STARTING = 1
    """Starting the preloader and device."""
    READY = 2
    """Accepting requests."""
    DRAINING = 3
    """Shutting down; finishing queued requests, accepting none."""

    @property
    def label(self) -> str:
        """Lower-case name, as messages show it ("starting", "draining")."""
        return self.name.lower()


class LoadPhase(enum.IntEnum):
    """Phase of a load as LoadProgress reports it (hotslot.common.v1.LoadPhase)."""

    UNSPECIFIED = 0
    QUEUED = 1
    """Waiting in the queue."""
    ENSURE = 2
    """Fetching files into the node-local cache."""
    READ = 3
    """Reading weights into memory."""
    MATERIALIZE = 4
    """Building modules and assigning weights."""
    SWAP = 5
    """Promoting into the active slot."""

    @property
    def label(self) -> str:
        """Lower-case name: the phase's span name and its `load_phase` progress parameter ("queued", "read")."""
        return self.name.lower()


PROTO_ENUMS: tuple[tuple[type[enum.IntEnum], str, Mapping[str, int]], ...] = (
    (Tier, "TIER_", dict(common_pb2.Tier.items())),
    (ExecutorState, "EXECUTOR_STATE_", dict(common_pb2.ExecutorState.items())),
    (LoadPhase, "LOAD_PHASE_", dict(common_pb2.LoadPhase.items())),
)
"""Each Python enum, the prefix of its proto values' names, and the proto enum's names and values."""


def proto_members(prefix: str, values: Mapping[str, int]) -> dict[str, int]:
    """A proto enum's members as the Python enum names them: `TIER_HOST = 3` -> `HOST: 3`."""
    return {name.removeprefix(prefix): value for name, value in values.items()}


def _check_against_proto() -> None:
    for python_enum, prefix, values in PROTO_ENUMS:
        ours = {member.name: member.value for member in python_enum}
        theirs = proto_members(prefix, values)
        if ours != theirs:
            raise ImportError(
                f"hotslot.tiers.{python_enum.__name__} {ours} differs from the proto's {theirs}: "
                f"add the new values to libs/core/hotslot/tiers.py after changing common.proto"
            )


_check_against_proto()
