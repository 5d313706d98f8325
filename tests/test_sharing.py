"""Sharing (issue 15): `farm export` bundles, `farm import` verifying every byte before writing, remotes, and two
farms side by side (two catalogs, two stores, two APIs on 127.0.0.1 in their own processes)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, text

from farm.bundles import export_adapter, import_bundle
from farm.catalog.models import Adapter, AdapterOrigin, Job
from farm.catalog.session import get_engine, session_scope
from farm.errors import AuthError, BundleError, ChecksumMismatch, FarmError, NotFound, SpecError
from farm.profiles import route
from farm.remotes import add_remote, import_from_remote, list_remotes
from farm.service import get_adapter, get_job, list_jobs, pull_adapter
from tests.adapters_use_helpers import cli, farm_settings, publish, small_files
from tests.fixtures.api import TOKENS
from tests.routing_set import ADAPTERS, write_datasets
from tests.test_client_http import start_api_server, stop_api_server

REPO_ROOT = Path(__file__).resolve().parents[1]


def _publish_sql(settings, tmp_path, seed="one", parent_id=None) -> int:
    data = write_datasets(tmp_path / "data")
    item = ADAPTERS["sql-helper"]
    return publish(settings, "sql-helper", small_files(seed), spec={"description": item["description"],
                                                                    "tags": item["tags"]},
                   dataset=data["sql-helper"], parent_id=parent_id)


def _nothing_imported(settings) -> None:
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Adapter)) == 0
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    store = Path(settings.store_url[len("file://"):])
    assert not (store / "adapters").exists() or not any((store / "adapters").rglob("*"))


@pytest.fixture
def farms(tmp_path):
    """Farm A with sql-helper v1 and v2 (v2 continued from v1), and an empty farm B."""
    a = farm_settings(tmp_path / "a")
    _publish_sql(a, tmp_path, "one")
    _publish_sql(a, tmp_path, "two", parent_id=1)
    b = farm_settings(tmp_path / "b")
    return a, b


def test_export_then_import_records_origin_lineage_and_the_same_bytes(farms, tmp_path):
    a, b = farms
    exported = export_adapter("sql-helper", tmp_path / "sql.tar", settings=a)
    assert exported.adapter == "sql-helper:2" and exported.files == 4
    with tarfile.open(tmp_path / "sql.tar") as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert names[0] == "manifest.json" and "files/checksums.json" in names
    assert manifest["lineage"][0]["adapter"] == "sql-helper:1" and manifest["profile"]["tags"] == ["sql", "database",
                                                                                                   "postgres"]
    source = get_adapter("sql-helper:2", settings=a)
    assert {p: e["sha256"] for p, e in manifest["files"].items()} == {f.path: f.sha256 for f in source.files}

    result = import_bundle(tmp_path / "sql.tar", settings=b)
    assert (result.adapter, result.already) == ("sql-helper:1", False)
    assert result.origin == {"farm_id": manifest["farm_id"], "name": "sql-helper", "version": 2,
                             "job_id": source.job_id}
    imported = get_adapter("sql-helper", settings=b)
    assert {f.path: f.sha256 for f in imported.files} == {f.path: f.sha256 for f in source.files}
    assert imported.provenance["imported"]["lineage"][0]["adapter"] == "sql-helper:1"
    assert imported.provenance["spec"]["description"] == ADAPTERS["sql-helper"]["description"]
    jobs = [get_job(j.id, settings=b) for j in list_jobs(settings=b)]
    assert [(j.kind, j.state, j.adapter) for j in jobs] == [("import", "succeeded", "sql-helper:1")]
    assert jobs[0].id == imported.job_id and jobs[0].spec["origin"] == result.origin
    pulled = pull_adapter("sql-helper", tmp_path / "pulled", settings=b)  # a normal, verified artifact
    assert (Path(pulled.dest) / "adapter_model.safetensors").read_bytes() == small_files("two")[
        "adapter_model.safetensors"]
    # B has no copy of the training data: the profile came in the bundle, so B routes to it
    assert route("join two tables in postgres", settings=b).choice == "sql-helper:1"


def test_a_name_clash_makes_a_new_version_and_the_same_bundle_twice_is_one_version(farms, tmp_path):
    a, b = farms
    _publish_sql(b, tmp_path, "b-own")
    export_adapter("sql-helper:1", tmp_path / "v1.tar", settings=a)
    first = import_bundle(tmp_path / "v1.tar", settings=b)
    assert first.adapter == "sql-helper:2"
    assert import_bundle(tmp_path / "v1.tar", settings=b).already is True
    assert import_bundle(tmp_path / "v1.tar", as_name="sql-from-a", settings=b).adapter == "sql-from-a:1"
    own = get_adapter("sql-helper:1", settings=b)
    assert own.files[0].sha256 and own.provenance.get("imported") is None  # B's own v1 untouched
    with pytest.raises(BundleError, match="adapter name"):
        import_bundle(tmp_path / "v1.tar", as_name="Bad Name", settings=b)


def _rewrite(src: Path, dest: Path, change) -> Path:
    """Copy a bundle member by member, letting `change(name, data, manifest)` return new bytes (None: drop)."""
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    manifest = json.loads(members[0][1])
    with tarfile.open(dest, "w") as out:
        for member, data in members:
            data = change(member.name, data, manifest)
            if data is None:
                continue
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return dest


def _flip_byte(name, data, manifest):
    if name == "files/adapter_model.safetensors":
        return data[:100] + bytes([data[100] ^ 1]) + data[101:]
    return data


def _manifest_lies(name, data, manifest):
    if name == "manifest.json":
        manifest["files"]["README.md"]["sha256"] = "0" * 64
        return json.dumps(manifest).encode()
    return data


def _checksums_disagree(name, data, manifest):
    if name == "files/README.md":
        return b"# changed\n"
    if name == "manifest.json":
        import hashlib

        manifest["files"]["README.md"] = {"size": 10, "sha256": hashlib.sha256(b"# changed\n").hexdigest()}
        return json.dumps(manifest).encode()
    return data


def _drop_weights(name, data, manifest):
    return None if name == "files/adapter_model.safetensors" else data


@pytest.mark.parametrize("change,message", [
    (_flip_byte, "has sha256"),
    (_manifest_lies, "records 0000"),
    (_checksums_disagree, "checksums.json does not list the same"),
    (_drop_weights, "does not hold it"),
])
def test_a_tampered_bundle_is_refused_and_leaves_nothing(farms, tmp_path, change, message):
    a, b = farms
    export_adapter("sql-helper", tmp_path / "good.tar", settings=a)
    bad = _rewrite(tmp_path / "good.tar", tmp_path / "bad.tar", change)
    with pytest.raises(BundleError, match=message) as info:
        import_bundle(bad, settings=b)
    assert "Nothing was imported" in info.value.message or "refus" in info.value.message
    _nothing_imported(b)


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def test_unsafe_or_broken_bundles_are_refused_before_anything_is_written(farms, tmp_path):
    a, b = farms
    export_adapter("sql-helper", tmp_path / "good.tar", settings=a)
    manifest = tarfile.open(tmp_path / "good.tar").extractfile("manifest.json").read()
    (tmp_path / "plain.txt").write_text("not a tar at all")
    with pytest.raises(BundleError, match="not a tar bundle"):
        import_bundle(tmp_path / "plain.txt", settings=b)
    with pytest.raises(BundleError, match="no such bundle"):
        import_bundle(tmp_path / "missing.tar", settings=b)
    good = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(good[: len(good) // 2])
    with pytest.raises(BundleError, match="truncated|damaged|does not hold"):
        import_bundle(tmp_path / "cut.tar", settings=b)

    link = tarfile.TarInfo("files/README.md")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    escaping = tarfile.TarInfo("files/../../evil")
    absolute = tarfile.TarInfo("/tmp/evil")
    unlisted = tarfile.TarInfo("files/extra.bin")
    for member, pattern in ((link, "is a link"), (escaping, "escaping"), (absolute, "absolute"),
                            (unlisted, "not listed")):
        bad = _tar_with(tmp_path / "bad.tar", [(tarfile.TarInfo("manifest.json"), manifest), (member, b"x")])
        with pytest.raises(BundleError, match=pattern):
            import_bundle(bad, settings=b)
    no_manifest = _tar_with(tmp_path / "nm.tar", [(tarfile.TarInfo("files/README.md"), b"x")])
    with pytest.raises(BundleError, match="first member must be manifest.json"):
        import_bundle(no_manifest, settings=b)
    with pytest.raises(BundleError, match="FARM_BUNDLE_MAX_BYTES"):
        import_bundle(tmp_path / "good.tar", settings=b.model_copy(update={"bundle_max_bytes": 1024}))
    assert not Path("/tmp/evil").exists()
    _nothing_imported(b)


def test_import_into_a_farm_on_s3_and_postgresql(farms, tmp_path, s3_store_url, pg_fresh_url):
    a, _ = farms
    export_adapter("sql-helper", tmp_path / "sql.tar", settings=a)
    c = farm_settings(tmp_path / "c", database_url=pg_fresh_url, store_url=s3_store_url.url,
                      s3_endpoint_url=s3_store_url.endpoint_url, s3_region="us-east-1")
    assert import_bundle(tmp_path / "sql.tar", settings=c).adapter == "sql-helper:1"
    assert import_bundle(tmp_path / "sql.tar", settings=c).already
    pulled = pull_adapter("sql-helper", tmp_path / "pulled", settings=c)
    assert (Path(pulled.dest) / "README.md").read_bytes() == small_files("two")["README.md"]
    export_adapter("sql-helper", tmp_path / "again.tar", settings=c)  # and out again, from S3
    with tarfile.open(tmp_path / "again.tar") as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert manifest["origin"]["name"] == "sql-helper" and manifest["origin"]["version"] == 2


def test_a_store_failure_during_import_takes_everything_back(farms, tmp_path, monkeypatch):
    import farm.bundles
    from farm.errors import StoreError

    a, b = farms
    export_adapter("sql-helper", tmp_path / "good.tar", settings=a)
    real_upload = farm.bundles.upload_tree

    def upload_then_fail(store, local_dir, prefix):
        real_upload(store, local_dir, prefix)
        raise StoreError("the store went away")

    monkeypatch.setattr(farm.bundles, "upload_tree", upload_then_fail)
    with pytest.raises(StoreError, match="went away"):
        import_bundle(tmp_path / "good.tar", settings=b)
    _nothing_imported(b)
    with session_scope(b.database_url) as session:
        assert session.execute(text("SELECT count(*) FROM job_events")).scalar() == 0


def test_export_refuses_unknown_adapters_existing_files_and_a_corrupt_store(farms, tmp_path):
    a, _ = farms
    with pytest.raises(NotFound):
        export_adapter("nope", tmp_path / "x.tar", settings=a)
    (tmp_path / "exists.tar").write_text("keep me")
    with pytest.raises(FarmError, match="already exists"):
        export_adapter("sql-helper", tmp_path / "exists.tar", settings=a)
    assert (tmp_path / "exists.tar").read_text() == "keep me"
    weights = Path(a.store_url[len("file://"):]) / "adapters/sql-helper/v2/adapter_model.safetensors"
    weights.write_bytes(b"corrupt" + weights.read_bytes()[7:])
    with pytest.raises(ChecksumMismatch):
        export_adapter("sql-helper", tmp_path / "corrupt.tar", settings=a)
    assert not (tmp_path / "corrupt.tar").exists() and not list(tmp_path.glob(".corrupt.tar*"))


def test_remotes_keep_only_the_name_of_the_token_variable(tmp_path, monkeypatch):
    settings = farm_settings(tmp_path)
    monkeypatch.setenv("FARM_REMOTE_LAB_TOKEN", "secret-token-value-123")
    remote = add_remote("lab", "http://127.0.0.1:9/", settings=settings)
    assert remote.token_env == "FARM_REMOTE_LAB_TOKEN" and remote.token_available
    assert [r.name for r in list_remotes(settings=settings)] == ["lab"]
    with get_engine(settings.database_url).connect() as conn:
        dump = json.dumps([list(r) for r in conn.execute(text("SELECT * FROM remotes"))], default=str)
    assert "secret-token-value-123" not in dump and "FARM_REMOTE_LAB_TOKEN" in dump
    with pytest.raises(SpecError, match="exists already"):
        add_remote("lab", "http://127.0.0.1:9", settings=settings)
    with pytest.raises(SpecError, match="URL"):
        add_remote("other", "ftp://x", settings=settings)
    with pytest.raises(SpecError, match="credentials"):
        add_remote("other", "http://u:p@host", settings=settings)
    with pytest.raises(NotFound, match="no remote called 'elsewhere'"):
        import_from_remote("elsewhere/sql-helper", settings=settings)


@pytest.fixture(scope="module")
def two_apis(tmp_path_factory):
    """Two farms, each with its own catalog, store and API process on 127.0.0.1; A holds sql-helper v1."""
    root = tmp_path_factory.mktemp("two-farms")
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(start_api_server(root / name))
        a = servers[0]
        _publish_sql(a.settings, root, "remote-one")
        yield servers[0], servers[1]
    finally:
        for server in servers:
            stop_api_server(server.proc)


def test_import_from_a_remote_farm_through_its_api(two_apis, monkeypatch):
    a, b = two_apis
    monkeypatch.setenv("FARM_REMOTE_FARM_A_TOKEN", TOKENS["bob"])
    add_remote("farm-a", a.url, settings=b.settings)
    result = import_from_remote("farm-a/sql-helper:1", as_name="sql-a", settings=b.settings)
    assert result.adapter == "sql-a:1" and result.origin["name"] == "sql-helper"
    src = get_adapter("sql-helper:1", settings=a.settings)
    assert result.origin["job_id"] == src.job_id
    with session_scope(b.settings.database_url) as session:
        origin = session.scalar(select(AdapterOrigin))
        assert origin.source.startswith("farm-a/sql-helper:1 (http://127.0.0.1:")
    # B's own API serves the imported adapter and routes to it
    auth = {"Authorization": f"Bearer {TOKENS['alice']}"}
    answer = httpx.get(f"{b.url}/v1/route", params={"q": "count rows with group by"}, headers=auth).json()
    assert answer["choice"] == "sql-a:1"
    bundle = httpx.get(f"{b.url}/v1/adapters/sql-a/1/bundle", headers=auth)
    assert bundle.status_code == 200 and bundle.headers["content-type"] == "application/x-tar"


def test_a_remote_that_refuses_the_token_or_lacks_the_adapter_writes_nothing(two_apis, tmp_path, monkeypatch):
    a, _ = two_apis
    c = farm_settings(tmp_path / "c")
    monkeypatch.setenv("FARM_REMOTE_FARM_A_TOKEN", "tok-wrong-000000000")
    add_remote("farm-a", a.url, settings=c)
    with pytest.raises(AuthError, match="refused the token"):
        import_from_remote("farm-a/sql-helper", settings=c)
    monkeypatch.setenv("FARM_REMOTE_FARM_A_TOKEN", TOKENS["alice"])
    with pytest.raises(NotFound):
        import_from_remote("farm-a/no-such-adapter", settings=c)
    monkeypatch.delenv("FARM_REMOTE_FARM_A_TOKEN")
    with pytest.raises(AuthError, match="set FARM_REMOTE_FARM_A_TOKEN"):
        import_from_remote("farm-a/sql-helper", settings=c)
    _nothing_imported(c)


def test_a_truncated_download_from_a_remote_writes_nothing(two_apis, tmp_path, monkeypatch):
    """A server that answers the adapter's view correctly but cuts the bundle off half-way."""
    a, _ = two_apis
    auth = {"Authorization": f"Bearer {TOKENS['alice']}"}
    view = httpx.get(f"{a.url}/v1/adapters/sql-helper", headers=auth).content
    bundle = httpx.get(f"{a.url}/v1/adapters/sql-helper/1/bundle", headers=auth).content

    class Cutting(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = bundle if self.path.endswith("/bundle") else view
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if self.path.endswith("/bundle") else body)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Cutting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = farm_settings(tmp_path / "c")
        monkeypatch.setenv("FARM_REMOTE_CUT_TOKEN", "anything-at-all")
        add_remote("cut", f"http://127.0.0.1:{server.server_address[1]}", settings=c)
        with pytest.raises(BundleError, match="Nothing was imported"):
            import_from_remote("cut/sql-helper", settings=c)
        _nothing_imported(c)
    finally:
        server.shutdown()


def _cli(settings, *args, env=None):
    full = {**os.environ, "FARM_DATABASE_URL": settings.database_url, "FARM_STORE_URL": settings.store_url,
            "FARM_HOME": str(settings.home), "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    full.pop("FARM_API_URL", None)
    return subprocess.run([sys.executable, "-m", "farm.cli.main", *args], capture_output=True, text=True, env=full,
                          cwd=REPO_ROOT, timeout=120)


def test_the_cli_exports_imports_and_refuses_a_tampered_bundle_with_exit_2(farms, tmp_path):
    a, b = farms
    out = cli(a, "export", "sql-helper:1", str(tmp_path / "cli.tar"))
    assert out.exit_code == 0 and "exported sql-helper:1" in out.stdout, out.output
    bad = _rewrite(tmp_path / "cli.tar", tmp_path / "cli-bad.tar", _flip_byte)
    refused = _cli(b, "import", str(bad))  # a real process: main() turns the error into exit 2
    assert refused.returncode == 2 and "invalid_bundle" in refused.stderr and "Traceback" not in refused.stderr
    _nothing_imported(b)
    ok = cli(b, "import", str(tmp_path / "cli.tar"), "--as", "sql-cli", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["adapter"] == "sql-cli:1"
    again = cli(b, "import", str(tmp_path / "cli.tar"), "--as", "sql-cli")
    assert "already imported as sql-cli:1" in again.stdout
    added = cli(b, "remote", "add", "lab", "http://127.0.0.1:9", env={"FARM_REMOTE_LAB_TOKEN": "tok-x"})
    assert added.exit_code == 0 and "FARM_REMOTE_LAB_TOKEN" in added.stdout
    listed = cli(b, "remote", "list", "--json")
    assert json.loads(listed.stdout)[0]["name"] == "lab" and "tok-x" not in listed.stdout


def test_import_from_a_remote_with_farm_api_url_lands_in_that_farm(two_apis, tmp_path, monkeypatch):
    """The client knows remote farm-a; with FARM_API_URL pointing at farm B, `farm import farm-a/NAME` brings the
    bundle to the client, which uploads it to B: B records it, the client's own catalog stays empty."""
    a, b = two_apis
    client = farm_settings(tmp_path / "client")
    monkeypatch.setenv("FARM_REMOTE_FARM_A_TOKEN", TOKENS["bob"])
    add_remote("farm-a", a.url, settings=client)
    out = cli(client, "import", "farm-a/sql-helper:1", "--as", "sql-via-api", "--json",
              env={"FARM_API_URL": b.url, "FARM_API_TOKEN": TOKENS["alice"]})
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["adapter"] == "sql-via-api:1"
    src = get_adapter("sql-helper:1", settings=a.settings)
    assert {f.path: f.sha256 for f in get_adapter("sql-via-api:1", settings=b.settings).files} == \
        {f.path: f.sha256 for f in src.files}
    with session_scope(client.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Adapter)) == 0


def test_export_and_import_go_through_the_api_when_farm_api_url_is_set(two_apis, tmp_path):
    """`farm export` from farm A's API and `farm import FILE.tar` into farm B's API, by a client whose own (empty)
    farm knows nothing: the bytes match A's, a tampered bundle is refused by B with nothing written."""
    a, b = two_apis
    empty = farm_settings(tmp_path / "client")
    to_a = {"FARM_API_URL": a.url, "FARM_API_TOKEN": TOKENS["alice"]}
    to_b = {"FARM_API_URL": b.url, "FARM_API_TOKEN": TOKENS["alice"]}
    out = cli(empty, "export", "sql-helper", str(tmp_path / "remote.tar"), "--json", env=to_a)
    assert out.exit_code == 0, out.output
    exported = json.loads(out.stdout)
    assert exported["adapter"] == "sql-helper:1"
    assert exported["files"] == len(get_adapter("sql-helper:1", settings=a.settings).files)
    assert exported["sha256"] == __import__("hashlib").sha256((tmp_path / "remote.tar").read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no part file left

    def uploaded():
        with session_scope(b.settings.database_url) as session:
            return session.scalar(select(func.count()).select_from(Adapter).where(Adapter.name == "sql-up"))

    bad = _rewrite(tmp_path / "remote.tar", tmp_path / "bad.tar", _flip_byte)
    with pytest.raises(BundleError):
        cli(empty, "import", str(bad), "--as", "sql-up", env=to_b)
    assert uploaded() == 0
    ok = cli(empty, "import", str(tmp_path / "remote.tar"), "--as", "sql-up", "--json", env=to_b)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["adapter"] == "sql-up:1" and uploaded() == 1
    src = get_adapter("sql-helper:1", settings=a.settings)
    assert {f.path: f.sha256 for f in get_adapter("sql-up:1", settings=b.settings).files} == \
        {f.path: f.sha256 for f in src.files}
    with session_scope(b.settings.database_url) as session:
        assert session.scalar(select(AdapterOrigin.source).where(AdapterOrigin.name == "sql-helper")
                              .order_by(AdapterOrigin.id.desc())) == "upload by alice"
    auth = {"Authorization": f"Bearer {TOKENS['alice']}"}
    empty_body = httpx.post(f"{b.url}/v1/bundles", content=b"", headers=auth)
    assert empty_body.status_code in (400, 422), empty_body.text
    assert "no bundle" in empty_body.json()["message"]
    unauth = httpx.post(f"{b.url}/v1/bundles", content=(tmp_path / "remote.tar").read_bytes())
    assert unauth.status_code == 401
    assert not (Path(empty.home) / "adapters").exists()  # nothing went through the client's own farm


def test_a_bundle_upload_over_the_limits_is_refused_with_413_and_nothing_written(farms, tmp_path):
    """POST /v1/bundles takes the upload limit (FARM_API_MAX_UPLOAD_BYTES, checked on Content-Length before the
    route runs) and FARM_BUNDLE_MAX_BYTES (checked while a body of unknown length streams in)."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from api.app import create_app

    a, b = farms
    export_adapter("sql-helper:1", tmp_path / "ok.tar", settings=a)
    bundle = (tmp_path / "ok.tar").read_bytes()
    auth = {"Authorization": f"Bearer {TOKENS['alice']}"}
    tokens = {"api_tokens": {"alice": SecretStr(TOKENS["alice"])}}
    small_upload = b.model_copy(update={**tokens, "api_max_upload_bytes": len(bundle) - 1})
    with TestClient(create_app(small_upload)) as client:
        r = client.post("/v1/bundles", content=bundle, headers=auth)
        assert r.status_code == 413 and "FARM_API_MAX_UPLOAD_BYTES" in r.json()["message"]
    small_bundle = b.model_copy(update={**tokens, "bundle_max_bytes": len(bundle) - 1})
    with TestClient(create_app(small_bundle)) as client:
        r = client.post("/v1/bundles", content=iter([bundle[:4096], bundle[4096:]]), headers=auth)
        assert r.status_code == 413 and "FARM_BUNDLE_MAX_BYTES" in r.json()["message"]
        assert client.post("/v1/bundles", content=bundle[:2048], headers=auth).status_code == 422  # cut off
    _nothing_imported(b)
    with TestClient(create_app(b.model_copy(update=tokens))) as client:
        r = client.post("/v1/bundles", content=bundle, headers=auth, params={"as_name": "fits"})
        assert r.status_code == 201 and r.json()["adapter"] == "fits:1"
