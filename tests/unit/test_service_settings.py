"""Every service's settings (its `settings.py`): bounds on every number, ports within 0-65535, and the limits that
used to be bare constants in code reaching the cores."""
from __future__ import annotations

import typing

import annotated_types
import pytest
from pydantic import ValidationError

from hotslot.services.executor.generation import GenerationLimits, GenerationParams, validate
from hotslot.services.executor.settings import ExecutorSettings
from hotslot.services.executor.wiring import limits_from
from hotslot.services.registry.settings import RegistrySettings
from hotslot.services.router.settings import RouterSettings
from hotslot.services.storage_cache.settings import StorageCacheSettings

SETTINGS = [RegistrySettings, StorageCacheSettings, RouterSettings, ExecutorSettings]
# Fields bounded by a validator of their own (with a hint in its message) rather than by Field(gt=...).
VALIDATED = {(StorageCacheSettings, "capacity_bytes"), (StorageCacheSettings, "read_chunk_bytes")}


def numeric_fields(cls):
    for name, field in cls.model_fields.items():
        types = [t for t in (typing.get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
        if any(isinstance(t, type) and issubclass(t, int | float) and t is not bool for t in types):
            yield name, field


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_number_has_a_lower_bound_and_every_port_an_upper_one(cls) -> None:
    unbounded, ports = [], []
    for name, field in numeric_fields(cls):
        lower = [m for m in field.metadata if isinstance(m, annotated_types.Ge | annotated_types.Gt)]
        upper = [m for m in field.metadata if isinstance(m, annotated_types.Le | annotated_types.Lt)]
        if not lower and (cls, name) not in VALIDATED:
            unbounded.append(name)
        if name.endswith("port") and not any(getattr(m, "le", None) == 65535 for m in upper):
            ports.append(name)
    assert unbounded == [] and ports == []


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("port", [70000, -1])
def test_a_port_outside_0_to_65535_is_refused(cls, port) -> None:
    with pytest.raises(ValidationError, match="port"):
        cls(port=port)


def test_registry_port_70000_is_refused_by_its_environment_variable_too(monkeypatch) -> None:
    monkeypatch.setenv("HOTSLOT_REGISTRY_PORT", "70000")
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        RegistrySettings()


def test_storage_cache_sizes_must_be_positive() -> None:
    for name in ("capacity_bytes", "read_chunk_bytes"):
        with pytest.raises(ValidationError, match="greater than 0"):
            StorageCacheSettings(**{name: 0})


def test_the_guidance_bound_is_a_setting() -> None:
    params = GenerationParams(prompt="a cat", guidance_scale=60.0)
    with pytest.raises(Exception, match="use 0 to 50"):
        validate(params, limits_from(ExecutorSettings()))
    assert validate(params, limits_from(ExecutorSettings(max_guidance=100))).guidance_scale == 60.0
    assert GenerationLimits().max_guidance == ExecutorSettings().max_guidance == 50


def test_executor_limits_that_were_constants_are_bounded_settings() -> None:
    s = ExecutorSettings()
    assert (s.load_timeout_s, s.retry_after_s, s.preloader_restart_wait_s, s.max_load_attempts) == (1800, 1, 60, 3)
    for bad in ({"load_timeout_s": 0}, {"retry_after_s": -1}, {"preloader_restart_wait_s": 0},
                {"max_load_attempts": 0}, {"max_guidance": 0}, {"active_budget_bytes": 0}, {"read_chunk_bytes": 1}):
        with pytest.raises(ValidationError):
            ExecutorSettings(**bad)


def test_the_host_pool_is_a_byte_size_or_auto_grown_to_the_largest_conversion_within_half_the_host_budget() -> None:
    assert ExecutorSettings().host_pool_sizing() == (0, 16 * 1024**3)  # auto, of the 32 GiB default host budget
    assert ExecutorSettings(host_budget_bytes="8GiB").host_pool_sizing() == (0, 4 * 1024**3)
    assert ExecutorSettings(convert_in_executor=False).host_pool_sizing() == (0, 0)  # auto: nothing to pool
    assert ExecutorSettings(host_pool_bytes="512MiB").host_pool_sizing() == (512 * 1024**2, 0)
    assert ExecutorSettings(host_pool_bytes=0).host_pool_sizing() == (0, 0)
    for bad in ("-1", "lots", "-4GiB"):
        with pytest.raises(ValidationError, match=r"give a byte size \(4GiB, 512MiB; 0 = off\) or auto"):
            ExecutorSettings(host_pool_bytes=bad)


def test_a_reserved_host_pool_needs_a_size_and_the_command_says_so_in_one_line() -> None:
    import typer
    from typer.testing import CliRunner

    from hotslot.bootstrap.settings_command import settings_command

    ran = []
    app = typer.Typer()
    app.command()(settings_command(ExecutorSettings, ran.append, "executor"))
    result = CliRunner().invoke(app, ["--host-pool-reserve"])
    assert result.exit_code == 2 and ran == []
    assert result.output.strip().splitlines() == [
        "INVALID_ARGUMENT: settings: host_pool_reserve makes the whole pool at start, so it needs a size: give "
        "host_pool_bytes (about one model's converted weights, e.g. 5GiB for SD 1.5 as fp32)"]
    bad = CliRunner().invoke(app, ["--host-pool-bytes", "lots"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [
        "INVALID_ARGUMENT: setting host_pool_bytes (--host-pool-bytes or HOTSLOT_EXECUTOR_HOST_POOL_BYTES): give a "
        "byte size (4GiB, 512MiB; 0 = off) or auto (got 'lots')"]
    with pytest.raises(ValidationError, match="no pool to reserve"):
        ExecutorSettings(host_pool_bytes=0, host_pool_reserve=True)
    assert CliRunner().invoke(app, ["--host-pool-bytes", "64MiB", "--host-pool-reserve"]).exit_code == 0
    assert ran[0].host_pool_sizing() == (64 * 1024**2, 0)
