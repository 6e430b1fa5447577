"""Executor membership: DNS joins and leaves, one entry per executor however many addresses reach it, stale status
versions dropped, reconnection, and a departing executor closed only after its requests finish."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hotslot.services.router.downstream import ExecutorClient, ExecutorConnector, ExecutorUnavailable
from hotslot.services.router.membership import ExecutorMembership, resolve_addresses, split_host_port
from hotslot.services.router.placement import ExecutorSnapshot
from hotslot.services.router.settings import RouterSettings


class StatusOnlyExecutor(ExecutorClient):
    """Publishes whatever status the test puts in; never asked to generate here."""

    def __init__(self, address: str, executor_id: str) -> None:
        self.address = address
        self.executor_id = executor_id
        self.statuses: asyncio.Queue[ExecutorSnapshot | Exception] = asyncio.Queue()
        self.closed = False
        self.watches = 0
        self.publish(1)

    def publish(self, version: int, depth: int = 0) -> None:
        self.statuses.put_nowait(ExecutorSnapshot(self.executor_id, self.address, True, (), depth, 8, version))

    async def watch_status(self) -> AsyncIterator[ExecutorSnapshot]:
        self.watches += 1
        while True:
            item = await self.statuses.get()
            if isinstance(item, Exception):
                raise item
            yield item

    async def generate(self, call, timeout_s) -> Any:
        raise NotImplementedError

    async def generate_stream(self, call, timeout_s):
        raise NotImplementedError
        yield

    async def preload(self, model_id, revision, timeout_s) -> Any:
        raise NotImplementedError

    async def evict(self, model_id, revision, timeout_s) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        self.closed = True


class Connector(ExecutorConnector):
    """Every address answers as the executor named in `ids` (several addresses may name one executor)."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids
        self.made: dict[str, StatusOnlyExecutor] = {}

    def connect(self, address: str) -> ExecutorClient:
        self.made[address] = StatusOnlyExecutor(address, self.ids[address])
        return self.made[address]


class FakeDns:
    def __init__(self, *answers: set[str] | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> set[str]:
        self.asked.append((host, port))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return {f"{ip}:{port}" for ip in answer}


async def settle(condition, steps: int = 200) -> None:
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def ids(membership: ExecutorMembership) -> list[str]:
    return [link.executor_id for link in membership.placeable()]


async def test_dns_answers_add_and_remove_executors_without_restart() -> None:
    connector = Connector({"10.0.0.1:7000": "e1", "10.0.0.2:7000": "e2", "10.0.0.3:7000": "e3"})
    dns = FakeDns({"10.0.0.1", "10.0.0.2"}, {"10.0.0.2", "10.0.0.3"}, OSError("SERVFAIL"))
    membership = ExecutorMembership(connector, dns_target="executors.hotslot.svc:7000", dns_refresh_s=3600,
                                    resolve=dns)
    changes = []
    membership.add_listener(lambda: changes.append(len(membership.placeable())))
    await membership.start()
    await settle(lambda: ids(membership) == ["e1", "e2"])
    assert dns.asked == [("executors.hotslot.svc", 7000)]

    await membership.refresh_dns()  # e1 left, e3 joined
    await settle(lambda: ids(membership) == ["e2", "e3"])
    await settle(lambda: connector.made["10.0.0.1:7000"].closed)
    assert membership.targets() == ["10.0.0.2:7000", "10.0.0.3:7000"]

    await membership.refresh_dns()  # a failed lookup keeps what was known
    assert membership.targets() == ["10.0.0.2:7000", "10.0.0.3:7000"]
    assert changes, "listeners hear of every change"
    await membership.close()
    assert all(client.closed for client in connector.made.values())


async def test_departing_executor_is_closed_only_after_its_requests_finish() -> None:
    connector = Connector({"10.0.0.1:7000": "e1"})
    dns = FakeDns({"10.0.0.1"}, set())
    membership = ExecutorMembership(connector, dns_target="x:7000", dns_refresh_s=3600, resolve=dns)
    await membership.start()
    await settle(lambda: ids(membership) == ["e1"])
    slot = membership.reserve(membership.placeable()[0])
    await membership.refresh_dns()
    assert ids(membership) == []
    await asyncio.sleep(0)
    assert not connector.made["10.0.0.1:7000"].closed
    membership.release(slot)
    await settle(lambda: connector.made["10.0.0.1:7000"].closed)
    await membership.close()


async def test_two_addresses_of_one_executor_count_once_and_static_targets_stay() -> None:
    connector = Connector({"127.0.0.1:7000": "e1", "[::1]:7000": "e1"})
    membership = ExecutorMembership(connector, static_targets=["127.0.0.1:7000", "[::1]:7000"])
    await membership.start()
    await settle(lambda: all(link.connected for link in membership._links.values()))
    assert [link.address for link in membership.placeable()] == ["127.0.0.1:7000"]
    await membership.close()


async def test_stale_versions_are_dropped_and_a_broken_stream_reconnects() -> None:
    connector = Connector({"h:1": "e1"})
    membership = ExecutorMembership(connector, static_targets=["h:1"], watch_backoff_s=0.001,
                                    watch_backoff_max_s=0.002)
    await membership.start()
    client = connector.made["h:1"]
    await settle(lambda: ids(membership) == ["e1"])
    link = membership.placeable()[0]
    before = membership.reserve(link)
    assert link.sent_since_status == 1
    client.publish(5, depth=3)
    client.publish(4, depth=9)  # late duplicate of an older state
    await settle(lambda: link.snapshot.version == 5)
    await asyncio.sleep(0)
    assert link.snapshot.queue_depth == 3 and link.sent_since_status == 0
    # A request sent after the status and finished before the next one stops counting; one sent before the
    # status is in its queue depth already.
    after = membership.reserve(link)
    membership.release(after)
    membership.release(before)
    assert (link.inflight, link.sent_since_status) == (0, 0)

    client.statuses.put_nowait(ExecutorUnavailable("socket closed"))
    await settle(lambda: ids(membership) == [])
    assert membership.unreachable_addresses() == ["h:1"]
    client.publish(1)  # restarted executor: versions start over on the new stream
    for _ in range(100):
        if ids(membership) == ["e1"]:
            break
        await asyncio.sleep(0.005)
    assert ids(membership) == ["e1"] and client.watches == 2
    await membership.close()


async def test_resolving_localhost_gives_host_port_targets() -> None:
    found = await resolve_addresses("localhost", 7000)
    assert found and all(target.endswith(":7000") for target in found)
    assert "127.0.0.1:7000" in found or "[::1]:7000" in found


@pytest.mark.parametrize("bad", ["nohost", ":7000", "host:", "host:port"])
def test_targets_must_be_host_port(bad: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        split_host_port(bad)
    assert split_host_port("[::1]:7000") == ("::1", 7000)


def test_settings_take_comma_separated_targets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSLOT_ROUTER_EXECUTORS", "10.0.0.1:50053, 10.0.0.2:50053,")
    monkeypatch.setenv("HOTSLOT_ROUTER_EXECUTORS_DNS", "executors.hotslot.svc:50053")
    settings = RouterSettings()
    assert settings.executors == ["10.0.0.1:50053", "10.0.0.2:50053"]
    assert settings.executors_dns == "executors.hotslot.svc:50053" and settings.port == 50050
    assert RouterSettings(executors="a:1").executors == ["a:1"]
    with pytest.raises(ValueError, match="host:port"):
        RouterSettings(executors="a:1,oops")
