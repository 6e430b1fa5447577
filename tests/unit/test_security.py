"""TLS, mTLS and bearer tokens of the shared bootstrap: a real server on a free port in this process, with
certificates made by hotslot.cluster.certs, called over real channels. The registry service is hosted with no
implementation, so a call that gets through authentication answers UNIMPLEMENTED."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotslot.bootstrap import security
from hotslot.bootstrap.security import (
    ClientSecurity,
    Scope,
    TokenTable,
    parse_tokens,
    required_scope,
    service_channel,
)
from hotslot.bootstrap.server import ServiceRegistration, create_server
from hotslot.bootstrap.settings import ServiceSettings
from hotslot.cluster import certs
from hotslot.registry.v1 import registry_service_pb2 as rpb
from hotslot.registry.v1 import registry_service_pb2_grpc as rgrpc

REGISTRY = rpb.DESCRIPTOR.services_by_name["RegistryService"].full_name


class NoRegistry(rgrpc.RegistryServiceServicer):
    """Every method answers UNIMPLEMENTED (the generated base class)."""


@pytest.fixture
def creds(tmp_path: Path) -> certs.LocalCredentials:
    return certs.generate(tmp_path / "tls")


def settings_for(creds: certs.LocalCredentials, *, mtls: bool = True, tokens: bool = True) -> ServiceSettings:
    return ServiceSettings(
        tls_cert_file=creds.service_cert, tls_key_file=creds.service_key,
        tls_client_ca_file=creds.ca if mtls else None, tokens_file=creds.tokens_file if tokens else None,
    )


async def serve(settings: ServiceSettings):
    regs = [ServiceRegistration(full_name=REGISTRY, servicer=NoRegistry(),
                                add_to_server=rgrpc.add_RegistryServiceServicer_to_server)]
    server, port, _health = await create_server("127.0.0.1:0", regs, settings=settings)
    await server.start()
    return server, f"127.0.0.1:{port}"


def user(creds: certs.LocalCredentials, token: str | None = None, *, cert: bool = True) -> ClientSecurity:
    return ClientSecurity(ca_file=creds.ca, cert_file=creds.client_cert if cert else None,
                          key_file=creds.client_key if cert else None, token=token)


async def code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def get_model(address: str, sec: ClientSecurity | None) -> grpc.StatusCode:
    async with service_channel(address, security=sec) as channel:
        return await code_of(rgrpc.RegistryServiceStub(channel).GetModel(rpb.GetModelRequest(model_id="m"), timeout=5))


async def register(address: str, sec: ClientSecurity | None) -> grpc.StatusCode:
    async with service_channel(address, security=sec) as channel:
        return await code_of(rgrpc.RegistryServiceStub(channel).RegisterModel(
            rpb.RegisterModelRequest(model_id="m", source="m"), timeout=5))


async def test_a_call_with_the_right_token_over_mtls_gets_through(creds) -> None:
    server, address = await serve(settings_for(creds))
    try:
        assert await get_model(address, user(creds, creds.generate_token)) == grpc.StatusCode.UNIMPLEMENTED
        assert await register(address, user(creds, creds.admin_token)) == grpc.StatusCode.UNIMPLEMENTED
        # admin includes generate
        assert await get_model(address, user(creds, creds.admin_token)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


async def test_a_call_without_a_token_or_with_a_bad_one_is_unauthenticated(creds) -> None:
    server, address = await serve(settings_for(creds))
    try:
        assert await get_model(address, user(creds)) == grpc.StatusCode.UNAUTHENTICATED
        assert await get_model(address, user(creds, "x" * 43)) == grpc.StatusCode.UNAUTHENTICATED
        assert await register(address, user(creds)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)


async def test_a_generate_token_on_an_admin_method_is_permission_denied(creds) -> None:
    server, address = await serve(settings_for(creds))
    try:
        assert await register(address, user(creds, creds.generate_token)) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(None)


async def test_health_answers_without_a_token(creds) -> None:
    server, address = await serve(settings_for(creds))
    try:
        async with service_channel(address, security=user(creds)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_mtls_refuses_plaintext_and_clients_without_a_certificate(creds) -> None:
    server, address = await serve(settings_for(creds))
    try:
        assert await get_model(address, None) == grpc.StatusCode.UNAVAILABLE
        assert await get_model(address, user(creds, creds.admin_token, cert=False)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_tls_without_a_client_ca_takes_clients_without_certificates(creds) -> None:
    server, address = await serve(settings_for(creds, mtls=False, tokens=False))
    try:
        assert await get_model(address, user(creds, cert=False)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


async def test_a_client_that_trusts_another_ca_is_refused(creds, tmp_path: Path) -> None:
    other = certs.generate(tmp_path / "other")
    server, address = await serve(settings_for(creds, mtls=False, tokens=False))
    try:
        assert await get_model(address, ClientSecurity(ca_file=other.ca)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_the_server_takes_a_new_certificate_from_disk_without_a_restart(creds, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(security, "RELOAD_CHECK_S", 0.0)
    server, address = await serve(settings_for(creds, mtls=False, tokens=False))
    try:
        new = certs.generate(tmp_path / "rotated")
        assert await get_model(address, ClientSecurity(ca_file=new.ca)) == grpc.StatusCode.UNAVAILABLE
        shutil.copy(new.service_cert, creds.service_cert)
        shutil.copy(new.service_key, creds.service_key)
        assert await get_model(address, ClientSecurity(ca_file=new.ca)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


async def test_tokens_are_reloaded_when_the_file_changes(creds, monkeypatch) -> None:
    monkeypatch.setattr(security, "RELOAD_CHECK_S", 0.0)
    server, address = await serve(settings_for(creds))
    try:
        fresh = "f" * 40
        creds.tokens_file.write_text(f"{fresh} admin\n")
        assert await get_model(address, user(creds, creds.admin_token)) == grpc.StatusCode.UNAUTHENTICATED
        assert await register(address, user(creds, fresh)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


async def test_a_client_channel_sends_the_new_token_after_its_file_changes(creds, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(security, "RELOAD_CHECK_S", 0.0)
    server, address = await serve(settings_for(creds))
    token_file = tmp_path / "token"
    token_file.write_text(creds.generate_token)
    sec = ClientSecurity(ca_file=creds.ca, cert_file=creds.client_cert, key_file=creds.client_key,
                         token_file=token_file)
    try:
        async with service_channel(address, security=sec) as channel:
            stub = rgrpc.RegistryServiceStub(channel)  # made once, as services do
            request = rpb.RegisterModelRequest(model_id="m", source="m")
            assert await code_of(stub.RegisterModel(request, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
            await asyncio.sleep(0.01)
            token_file.write_text(creds.admin_token)
            assert await code_of(stub.RegisterModel(request, timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


def test_methods_not_in_the_table_need_admin_and_health_is_open() -> None:
    assert required_scope("/hotslot.router.v1.RouterService/Generate") is Scope.GENERATE
    assert required_scope("/hotslot.storage.v1.StorageCacheService/PutFile") is Scope.ADMIN
    assert required_scope("/hotslot.some.v9.NewService/Anything") is Scope.ADMIN
    assert required_scope("/grpc.health.v1.Health/Check") is None


def test_a_bad_tokens_file_is_refused_without_echoing_the_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as refused:
        parse_tokens("s3cr3t-s3cr3t-s3cr3t superuser\n", "tokens")
    assert "s3cr3t" not in str(refused.value)
    with pytest.raises(ValueError, match="at least 16"):
        parse_tokens("short admin\n")
    path = tmp_path / "tokens"
    path.write_text("# comment\n\n" + "a" * 20 + " generate  # trailing\n")
    assert TokenTable(path).scope_of("a" * 20) is Scope.GENERATE
    assert TokenTable(path).scope_of("a" * 19) is None


def test_settings_refuse_half_a_tls_configuration(creds) -> None:
    with pytest.raises(ValueError, match="tls_key_file"):
        ServiceSettings(tls_cert_file=creds.service_cert)
    with pytest.raises(ValueError, match="needs TLS"):
        ServiceSettings(tls_client_ca_file=creds.ca)
    with pytest.raises(ValueError, match="client_tls_ca_file"):
        ServiceSettings(client_tls_cert_file=creds.client_cert, client_tls_key_file=creds.client_key)


async def test_the_health_port_answers_probes_in_plaintext_while_the_service_port_needs_mtls(creds) -> None:
    import socket

    from hotslot.bootstrap.server import run_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    settings = settings_for(creds).model_copy(update={"health_port": health_port})
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    regs = [ServiceRegistration(full_name=REGISTRY, servicer=NoRegistry(),
                                add_to_server=rgrpc.add_RegistryServiceServicer_to_server)]
    task = asyncio.ensure_future(run_server(regs, settings=settings, service_name="test",
                                            on_started=lambda port: started.set_result(port)))
    try:
        port = await asyncio.wait_for(started, 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=REGISTRY), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # The health port serves health only: the API is not reachable around TLS and tokens through it.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rgrpc.RegistryServiceStub(channel).GetModel(rpb.GetModelRequest(model_id="m"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "not found" in err.value.details().lower()
        assert await get_model(f"127.0.0.1:{port}", None) == grpc.StatusCode.UNAVAILABLE
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unusable_tls_or_token_files_stop_the_server_naming_the_file(creds, tmp_path: Path) -> None:
    from hotslot.bootstrap.security import SecurityConfigError

    other = certs.generate(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    bad_tokens = tmp_path / "tokens"
    bad_tokens.write_text("short admin\n")
    cases = [
        (dict(tls_cert_file=garbage, tls_key_file=creds.service_key), "tls_cert_file"),
        (dict(tls_cert_file=creds.service_cert, tls_key_file=other.service_key), "is not the key of"),
        (dict(tokens_file=bad_tokens), "at least 16"),
    ]
    for fields, needle in cases:
        with pytest.raises(SecurityConfigError, match=needle):
            await serve(ServiceSettings(**fields))
