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
