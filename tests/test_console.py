"""The web console (/ui) and the offline API docs in-process: sign-in and the session cookie, every page behind
it, filters and pages, the chart's points, cancel with its CSRF token, an adapter's card, files and lineage.
(tests/test_console_browser.py drives the same pages in a real browser against a farm with a worker.)"""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlparse

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from farm import service
from farm.catalog import repository as repo
from farm.catalog.models import Adapter
from farm.catalog.session import session_scope
from farm.settings import FarmSettings
from tests.fixtures.api import TOKENS, adapter_files, publish_test_adapter


@pytest.fixture
def settings(tmp_path, sqlite_url, redis_url):
    return FarmSettings(home=tmp_path / "home", database_url=sqlite_url, broker_url=redis_url,
                        store_url=f"file://{tmp_path}/store", work_dir=tmp_path / "work", cache_dir=tmp_path / "cache",
                        api_tokens=TOKENS)


@pytest.fixture
def app(settings):
    return create_app(settings, poll_seconds=0.02)


@pytest.fixture
def anon(app):
    with TestClient(app, follow_redirects=False) as c:
        yield c


def login_csrf(client) -> str:
    """The sign-in form's CSRF token, as a browser gets it with the form (its nonce cookie lands in `client`)."""
    form = client.get("/ui/login")
    assert form.status_code == 200
    return re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)


def sign_in(client, token: str, next_url: str | None = "/ui/jobs"):
    """Post the sign-in form the way the page does: its token field, next, and the form's CSRF token."""
    data = {"token": token, "csrf": login_csrf(client), **({"next": next_url} if next_url else {})}
    return client.post("/ui/login", data=data)


@pytest.fixture
def ui(app):
    with TestClient(app, follow_redirects=False) as c:
        r = sign_in(c, TOKENS["alice"])
        assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
        yield c


def make_job(settings, name="bot", state_events=(), progress=()) -> str:
    with session_scope(settings.database_url) as session:
        job = repo.create_job(session, kind="train", name=name, queue="farm.cpu", spec={"kind": "train", "name": name},
                              spec_hash="1" * 64, max_attempts=3, submitted_by="alice")
        for step, loss in progress:
            repo.add_event(session, job.id, 1, "progress",
                           data={"step": step, "total_steps": 10, "loss": loss, "lr": 1e-3, "tokens_per_s": 123.456})
        return job.id


# ------------------------------------------------------------------ sign-in


def test_every_page_redirects_to_sign_in_without_a_valid_session(app, anon, settings):
    job_id = make_job(settings)
    publish_test_adapter(settings, "bot", adapter_files("a"))
    paths = []
    from api.ui import adapter_pages, pages

    for route in [*pages.router.routes, *adapter_pages.router.routes]:
        path = route.path
        if not path.startswith("/ui") or path in ("/ui", "/ui/login") or path.startswith("/ui/static"):
            continue
        concrete = (path.replace("{job_id}", job_id).replace("{name}", "bot").replace("{version}", "1")
                    .replace("{path:path}", "README.md"))
        for method in route.methods:
            paths.append((method, concrete))
    assert len(paths) >= 11, paths
    bad_cookies = [{}, {"farm_session": "garbage"}, {"farm_session": TOKENS["alice"]}]
    for method, path in paths:
        for cookies in bad_cookies:
            anon.cookies.clear()
            anon.cookies.update(cookies)
            r = anon.request(method, path)
            assert r.status_code == 303, (method, path, r.status_code, r.text[:200])
            target = urlparse(r.headers["location"])
            assert target.path == "/ui/login" and parse_qs(target.query)["next"][0].startswith(path.split("?")[0])
    anon.cookies.clear()
    assert anon.get("/ui/login").status_code == 200


def test_the_session_cookie_is_signed_httponly_strict_and_never_holds_the_token(anon, settings):
    r = sign_in(anon, "tok-wrong", None)
    assert r.status_code == 401 and "not one of this farm" in r.text and "set-cookie" not in r.headers
    r = sign_in(anon, TOKENS["bob"], "//evil.example/x")
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"  # no open redirect
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("farm_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/ui" in cookie
    value = anon.cookies["farm_session"]
    assert TOKENS["bob"] not in value and TOKENS["bob"] not in cookie
    page = anon.get("/ui/jobs")
    assert page.status_code == 200 and "signed in as <b>bob</b>" in page.text

    # a cookie signed under other tokens (or for a token since removed) is refused
    changed = create_app(settings.model_copy(update={"api_tokens": {"alice": SecretStr(TOKENS["alice"])}}))
    with TestClient(changed, follow_redirects=False) as other:
        other.cookies.set("farm_session", value, path="/ui")
        assert other.get("/ui/jobs").status_code == 303
    anon.post("/ui/logout")
    assert anon.get("/ui/jobs").status_code == 303


def test_the_sign_in_form_refuses_a_post_without_its_own_csrf_token(anon, app):
    """Login CSRF: another site's page posting a valid token (the attacker's) to /ui/login must not sign the
    visitor in. The form carries a signed nonce whose cookie is HttpOnly, SameSite=Strict, scoped to /ui/login."""
    form = anon.get("/ui/login")
    cookie = form.headers["set-cookie"]
    assert cookie.startswith("farm_login_csrf=") and "HttpOnly" in cookie and "Path=/ui/login" in cookie
    assert "samesite=strict" in cookie.lower()
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    nonce = anon.cookies["farm_login_csrf"]

    def refused(r):
        assert r.status_code == 403 and "farm_session" not in r.headers.get("set-cookie", ""), r.text[:300]
        assert "sign in again" in r.text and 'name="csrf"' in r.text  # a fresh form to try again with

    with TestClient(app, follow_redirects=False) as other_site:  # a cross-site post: no cookie, no form token
        refused(other_site.post("/ui/login", data={"token": TOKENS["bob"], "next": "/ui/jobs"}))
        other_site.cookies.set("farm_login_csrf", "x" * 43, path="/ui/login")  # a cookie without its signature
        refused(other_site.post("/ui/login", data={"token": TOKENS["bob"], "csrf": "x" * 43}))
        # the form's token is bound to the nonce of the browser that loaded it, not to any other one
        refused(other_site.post("/ui/login", data={"token": TOKENS["bob"], "csrf": token}))
    refused(anon.post("/ui/login", data={"token": TOKENS["bob"], "csrf": token + "x"}))
    anon.cookies.clear()  # the form's token without the cookie it signs
    refused(anon.post("/ui/login", data={"token": TOKENS["bob"], "csrf": token}))
    anon.cookies.clear()
    anon.cookies.set("farm_login_csrf", nonce, path="/ui/login")
    ok = anon.post("/ui/login", data={"token": TOKENS["bob"], "csrf": token})
    assert ok.status_code == 303 and "farm_session" in anon.cookies
    assert anon.get("/ui/jobs").status_code == 200


# ------------------------------------------------------------------ jobs


def test_jobs_table_filters_and_pages(ui, settings):
    ids = [make_job(settings, name=f"bot{i % 2}") for i in range(30)]
    page1 = ui.get("/ui/jobs")
    assert page1.status_code == 200
    assert page1.text.count('data-job="') == 25 and "older →" in page1.text
    page2 = ui.get("/ui/jobs?page=2")
    assert page2.text.count('data-job="') == 5 and "← newer" in page2.text
    only = ui.get("/ui/jobs?name=bot1&state=queued&kind=train")
    assert only.text.count('data-job="') == 15 and ">bot0<" not in only.text
    assert ui.get("/ui/jobs?state=succeeded").text.count('data-job="') == 0
    service.cancel_job(ids[0], settings=settings)
    cancelled = ui.get("/ui/jobs?state=cancelled").text
    assert f'data-job="{ids[0]}"' in cancelled and 'data-state="cancelled"' in cancelled


def test_job_page_has_the_chart_series_events_and_a_cancel_form_that_needs_its_csrf_token(ui, settings):
    job_id = make_job(settings, progress=[(1, 2.5), (2, 2.25), (3, 2.0)])
    page = ui.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200
    series = re.search(r'<script type="application/json" id="series">(.*?)</script>', page.text, re.S).group(1)
    assert series.count('"step"') == 3 and '"loss": 2.25' in series.replace('"loss":2.25', '"loss": 2.25')
    assert "123.5" in page.text  # rounded tokens/s, never 123.456000001
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)

    r = ui.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": "forged"})
    assert r.status_code == 303 and service.get_job(job_id, settings=settings).state == "queued"
    r = ui.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf})
    assert r.status_code == 303 and service.get_job(job_id, settings=settings).state == "cancelled"
    after = ui.get(r.headers["location"]).text
    assert "Cancel requested" in after and 'id="cancel-form"' not in after

    # a finished job's stream replays its events and ends
    with ui.stream("GET", f"/ui/jobs/{job_id}/stream") as stream:
        body = "".join(stream.iter_text())
    assert body.count("event: progress") == 3 and "event: end" in body


def test_an_unknown_job_or_adapter_is_an_html_404_page(ui):
    r = ui.get("/ui/jobs/ffffffffffff")
    assert r.status_code == 404 and "<html" in r.text and "not found" in r.text
    r = ui.get("/ui/adapters/nope/3")
    assert r.status_code == 404 and "nope" in r.text


# ------------------------------------------------------------------ adapters and workers


def test_adapter_page_card_provenance_files_downloads_and_lineage(ui, settings):
    files = adapter_files("v1")
    files["README.md"] = b"# bot v1\n\nA card with <script>alert(1)</script> in it.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    publish_test_adapter(settings, "bot", files)
    publish_test_adapter(settings, "bot", adapter_files("v2"))
    with session_scope(settings.database_url) as session:
        v1, v2 = session.query(Adapter).order_by(Adapter.version).all()
        v2.parent_adapter_id = v1.id

    listing = ui.get("/ui/adapters").text
    assert 'href="/ui/adapters/bot/1"' in listing and 'href="/ui/adapters/bot/2"' in listing
    assert ui.get("/ui/adapters/bot").status_code == 200

    page = ui.get("/ui/adapters/bot/1").text
    assert "<h1>bot v1</h1>" in page and "<table>" in page  # the model card, rendered
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page  # raw HTML in a card is escaped
    assert "org/tiny" in page and "store:datasets/x.jsonl" in page and "train_loss" in page
    assert 'data-relation="self"' in page and 'data-relation="child"' in page and "bot:v2" in page
    assert 'data-relation="replay"' in page  # same spec hash
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        assert sha in page
        r = ui.get(f"/ui/adapters/bot/1/files/{name}")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == sha
    parent_page = ui.get("/ui/adapters/bot/2").text
    assert 'data-relation="parent"' in parent_page and "bot:v1" in parent_page


def test_workers_page_shows_the_metrics_queue_figures_and_a_flower_link(ui, settings):
    make_job(settings)
    page = ui.get("/ui/workers").text
    assert "farm.cpu" in page and "No worker answered" in page and "Flower" in page
    assert re.search(r'<td class="mono">farm.cpu</td><td class="num">0</td>', page)
    assert re.search(r'state-queued">queued</span></a></td><td class="num">1</td>', page)


# ------------------------------------------------------------------ offline docs


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_only_assets_the_farm_serves(anon, path):
    page = anon.get(path)
    assert page.status_code == 200
    parser = _Refs()
    parser.feed(page.text)
    refs = parser.refs + re.findall(r"url: *['\"]([^'\"]+)['\"]", page.text)
    refs += re.findall(r"<redoc spec-url=\"([^\"]+)\"", page.text)
    assert refs, page.text
    assert not re.search(r"https?://", page.text), "the page names a remote URL"
    for ref in refs:
        assert ref.startswith("/"), ref
        assert anon.get(ref).status_code == 200, ref
    assert any(r.endswith(".js") for r in refs)
