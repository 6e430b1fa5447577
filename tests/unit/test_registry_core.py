"""Registry core and SQLite store: registration, revisions, refusals, listing, deletion and watch."""
from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from hotslot.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from hotslot.services.registry.core import MAX_LABELS, RegistryCore
from hotslot.services.registry.store import MIGRATIONS, SQLiteModelStore


def write_pipeline_dir(root: Path, rel: str, unet_bytes: bytes = b"unet-weights") -> Path:
    d = root / rel
    (d / "unet").mkdir(parents=True)
    (d / "vae").mkdir()
    (d / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [None, None],
            }
        )
    )
    (d / "unet" / "config.json").write_text('{"sample_size": 8}')
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(unet_bytes)
    (d / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae-weights" * 1000)
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "share"
    r.mkdir()
    return r


@pytest.fixture
def core(tmp_path: Path, root: Path):
    store = SQLiteModelStore(tmp_path / "db" / "registry.db")
    # A small hash chunk proves files larger than one chunk hash correctly with bounded reads.
    c = RegistryCore(store, root, hash_chunk_bytes=1024, default_page_size=2, max_page_size=3)
    yield c
    store.close()


async def test_register_scans_every_file_with_sha256_and_size(core: RegistryCore, root: Path) -> None:
    d = write_pipeline_dir(root, "models/a")
    record, created = await core.register("sd-a", "", "", "models/a", {"team": "x"})
    assert created and record.revision == 1 and record.kind == "DIFFUSERS_PIPELINE"
    assert record.manifest.pipeline_class == "StableDiffusionPipeline"
    assert [c.name for c in record.manifest.components] == ["unet", "vae"]
    files = {f.path: f for f in record.manifest.files}
    assert set(files) == {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    for rel, entry in files.items():
        data = (d / rel).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.size_bytes == len(data)
    assert record.manifest.total_bytes == sum(f.size_bytes for f in record.manifest.files)


async def test_unchanged_source_keeps_revision_changed_source_makes_new_one(core: RegistryCore, root: Path) -> None:
    d = write_pipeline_dir(root, "models/a")
    first, _ = await core.register("sd-a", "", "", "models/a", {})
    again, created = await core.register("sd-a", "", "", "models/a", {"stage": "prod"})
    assert not created and again.revision == first.revision and again.labels == {"stage": "prod"}
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"retrained")
    second, created = await core.register("sd-a", "", "", "models/a", {})
    assert created and second.revision == 2
    assert (await core.get("sd-a")).revision == 2
    assert (await core.get("sd-a", 1)).manifest.digest == first.manifest.digest
    with pytest.raises(NotFound, match="no revision 7"):
        await core.get("sd-a", 7)


@pytest.mark.parametrize(
    "model_id", ["", "Upper", "-lead", "a" * 129, "has space", "sl/ash", "ü"],
)
async def test_bad_model_id_is_invalid_argument(core: RegistryCore, root: Path, model_id: str) -> None:
    write_pipeline_dir(root, "models/a")
    with pytest.raises(InvalidArgument) as err:
        await core.register(model_id, "", "", "models/a", {})
    assert err.value.violations[0].field == "model_id"


@pytest.mark.parametrize(
    ("source", "needle"),
    [("/etc", "absolute"), ("models/../../etc", "'..'"), ("", "required")],
)
async def test_bad_source_paths_are_refused(core: RegistryCore, source: str, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        await core.register("m", "", "", source, {})


async def test_source_symlink_escaping_root_is_refused(core: RegistryCore, root: Path, tmp_path: Path) -> None:
    outside = write_pipeline_dir(tmp_path, "outside")
    (root / "models").mkdir()
    (root / "models" / "link").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="symlink"):
        await core.register("m", "", "", "models/link", {})


async def test_file_symlink_escaping_root_is_refused_naming_the_file(
    core: RegistryCore, root: Path, tmp_path: Path
) -> None:
    d = write_pipeline_dir(root, "models/a")
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x")
    (d / "vae" / "extra.safetensors").symlink_to(secret)
    with pytest.raises(InvalidArgument, match="vae/extra.safetensors"):
        await core.register("m", "", "", "models/a", {})


async def test_symlink_inside_root_is_followed(core: RegistryCore, root: Path) -> None:
    shared = write_pipeline_dir(root, "blobs/shared-vae")
    d = write_pipeline_dir(root, "models/a")
    target = d / "vae" / "diffusion_pytorch_model.safetensors"
    target.unlink()
    target.symlink_to(shared / "vae" / "diffusion_pytorch_model.safetensors")
    record, _ = await core.register("m", "", "", "models/a", {})
    assert "vae/diffusion_pytorch_model.safetensors" in {f.path for f in record.manifest.files}


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".pkl"])
async def test_pickle_weights_are_refused_naming_the_file(core: RegistryCore, root: Path, suffix: str) -> None:
    d = write_pipeline_dir(root, "models/a")
    (d / "unet" / f"weights{suffix}").write_bytes(b"pickle")
    with pytest.raises(InvalidArgument, match=f"unet/weights\\{suffix}.*safetensors only"):
        await core.register("m", "", "", "models/a", {})
    with pytest.raises(NotFound):
        await core.get("m")


async def test_missing_or_malformed_model_index_is_refused(core: RegistryCore, root: Path) -> None:
    d = write_pipeline_dir(root, "models/a")
    (d / "model_index.json").unlink()
    with pytest.raises(InvalidArgument, match="model_index.json is missing"):
        await core.register("m", "", "", "models/a", {})
    (d / "model_index.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        await core.register("m", "", "", "models/a", {})
    (d / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(InvalidArgument, match="_class_name"):
        await core.register("m", "", "", "models/a", {})
    (d / "model_index.json").write_text('{"_class_name": "X", "unet": ["diffusers"]}')
    with pytest.raises(InvalidArgument, match="component 'unet'"):
        await core.register("m", "", "", "models/a", {})
    assert (await core.list(0, "", None, {})).models == []


async def test_missing_source_is_not_found(core: RegistryCore) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        await core.register("m", "", "", "models/nope", {})


async def test_lora_needs_an_existing_pipeline_base(core: RegistryCore, root: Path) -> None:
    lora = root / "loras" / "style"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    with pytest.raises(InvalidArgument, match="base_model_id"):
        await core.register("style", "LORA_ADAPTER", "", "loras/style", {})
    with pytest.raises(NotFound, match="base model 'sd-a'"):
        await core.register("style", "LORA_ADAPTER", "sd-a", "loras/style", {})
    write_pipeline_dir(root, "models/a")
    await core.register("sd-a", "", "", "models/a", {})
    record, created = await core.register("style", "LORA_ADAPTER", "sd-a", "loras/style", {})
    assert created and record.base_model_id == "sd-a" and record.manifest.pipeline_class == ""
    with pytest.raises(FailedPrecondition, match="base of LoRA"):
        await core.delete("sd-a")
    with pytest.raises(FailedPrecondition, match="registered as LORA_ADAPTER"):
        await core.register("style", "DIFFUSERS_PIPELINE", "", "models/a", {})
    with pytest.raises(InvalidArgument, match="base_model_id"):
        await core.register("sd-b", "DIFFUSERS_PIPELINE", "sd-a", "models/a", {})


async def test_list_pages_and_filters(core: RegistryCore, root: Path) -> None:
    for i in range(5):
        write_pipeline_dir(root, f"models/m{i}", unet_bytes=bytes([i]))
        await core.register(f"m{i}", "", "", f"models/m{i}", {"parity": "even" if i % 2 == 0 else "odd"})
    page = await core.list(0, "", None, {})
    assert [m.model_id for m in page.models] == ["m0", "m1"] and page.next_page_token
    seen = [m.model_id for m in page.models]
    while page.next_page_token:
        page = await core.list(0, page.next_page_token, None, {})
        seen += [m.model_id for m in page.models]
    assert seen == ["m0", "m1", "m2", "m3", "m4"]
    assert [m.model_id for m in (await core.list(50, "", None, {})).models] == ["m0", "m1", "m2"]  # capped at 3
    even = await core.list(10, "", None, {"parity": "even"})
    assert [m.model_id for m in even.models] == ["m0", "m2", "m4"]
    assert (await core.list(10, "", "LORA_ADAPTER", {})).models == []
    with pytest.raises(InvalidArgument, match="page_token"):
        await core.list(0, "garbage!", None, {})
    token = (await core.list(1, "", None, {})).next_page_token
    with pytest.raises(InvalidArgument, match="different filter"):
        await core.list(1, token, None, {"parity": "odd"})
    with pytest.raises(InvalidArgument, match="page_size"):
        await core.list(-1, "", None, {})


async def test_delete_removes_every_revision(core: RegistryCore, root: Path) -> None:
    d = write_pipeline_dir(root, "models/a")
    await core.register("sd-a", "", "", "models/a", {})
    (d / "unet" / "config.json").write_text("{}")
    await core.register("sd-a", "", "", "models/a", {})
    assert await core.delete("sd-a") == 2
    with pytest.raises(NotFound):
        await core.get("sd-a")
    with pytest.raises(NotFound):
        await core.delete("sd-a")


async def test_watch_sends_snapshot_then_changes(core: RegistryCore, root: Path) -> None:
    write_pipeline_dir(root, "models/a")
    write_pipeline_dir(root, "models/b", unet_bytes=b"b")
    await core.register("sd-a", "", "", "models/a", {})
    events = core.watch()
    first = await anext(events)
    assert (first.type, first.model.model_id) == ("EXISTING", "sd-a")
    assert (await anext(events)).type == "SYNCED"
    await core.register("sd-b", "", "", "models/b", {})
    registered = await asyncio.wait_for(anext(events), 5)
    assert (registered.type, registered.model.model_id) == ("REGISTERED", "sd-b")
    await core.delete("sd-a")
    deleted = await asyncio.wait_for(anext(events), 5)
    assert (deleted.type, deleted.model.model_id) == ("DELETED", "sd-a")
    await events.aclose()
    assert not core._watchers


def test_store_survives_restart_and_records_schema_version(tmp_path: Path, root: Path) -> None:
    write_pipeline_dir(root, "models/a")
    db = tmp_path / "r.db"
    store = SQLiteModelStore(db)
    core = RegistryCore(store, root)
    asyncio.run(core.register("sd-a", "", "", "models/a", {}))
    store.close()
    reopened = SQLiteModelStore(db)
    assert reopened.schema_version() == len(MIGRATIONS)
    assert reopened.get("sd-a").revision == 1
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    SQLiteModelStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(FailedPrecondition, match="upgrade hotslot"):
        SQLiteModelStore(db)


def test_concurrent_writers_from_many_threads_and_stores(tmp_path: Path, root: Path) -> None:
    """Eight threads over two store instances (as two processes would) register changing sources of one model and
    distinct models; every write lands and revisions are dense."""
    db = tmp_path / "r.db"
    stores = [SQLiteModelStore(db), SQLiteModelStore(db)]
    for i in range(8):
        write_pipeline_dir(root, f"models/m{i}", unet_bytes=bytes([i]) * 10)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            core = RegistryCore(stores[i % 2], root)
            asyncio.run(core.register(f"m{i}", "", "", f"models/m{i}", {}))
            asyncio.run(core.register("shared", "", "", f"models/m{i}", {}))
        except BaseException as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(stores[0].list_latest(after_id="", limit=100, kind=None, labels={})) == 9
    latest = stores[1].get("shared").revision
    assert 1 <= latest <= 8
    assert [stores[0].get("shared", r).revision for r in range(1, latest + 1)] == list(range(1, latest + 1))
    for s in stores:
        s.close()


async def test_a_full_database_is_resource_exhausted_naming_it_and_reads_go_on(
    core: RegistryCore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite's max_page_count makes the database "full" the way a full disk does (SQLITE_FULL), without root;
    # it is per connection, and the store has one per thread.
    write_pipeline_dir(root, "models/a")
    write_pipeline_dir(root, "models/b", unet_bytes=b"other")
    await core.register("sd-a", "", "", "models/a", {})
    real_conn, limit = core.store._conn, {"pages": 1073741823}

    def limited():
        conn = real_conn()
        conn.execute(f"PRAGMA max_page_count = {limit['pages']}")
        return conn

    monkeypatch.setattr(core.store, "_conn", limited)
    limit["pages"] = real_conn().execute("PRAGMA page_count").fetchone()[0]
    with pytest.raises(ResourceExhausted, match="registry database .*registry.db is full"):
        await core.register("sd-b", "", "", "models/b", {f"k{i}": "x" * 256 for i in range(MAX_LABELS)})
    assert (await core.get("sd-a")).model_id == "sd-a"
    limit["pages"] = 1073741823
    record, created = await core.register("sd-b", "", "", "models/b", {})  # nothing half-written was left
    assert created and record.revision == 1
