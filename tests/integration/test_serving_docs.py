"""/docs (Swagger UI) and /redoc render from the serving process alone: no CDN, no internet."""

import json
import re
import urllib.request
from urllib.parse import urljoin, urlsplit

import pytest
from playwright.sync_api import expect

from tests.browser import chromium
from tests.serving_fixtures import served_with_broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TITLE = "churn-platform serving"
LOCAL_HOSTS = {"127.0.0.1"}
RENDER_TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_with_broker(tmp_path_factory.mktemp("serving-docs")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


class OfflineTab:
    """A browser tab that can only reach 127.0.0.1: every other request is aborted and recorded,
    and page errors are recorded too."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.aborted: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._only_local)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _only_local(self, route) -> None:
        url = route.request.url
        if urlsplit(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.aborted.append(url)
            route.abort("internetdisconnected")

    def close(self) -> None:
        self.context.close()


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.headers.get("content-type", ""), response.read()


def test_swagger_ui_renders_the_api_without_internet(server, browser):
    tab = OfflineTab(browser)
    try:
        tab.page.goto(f"{server.http}/docs")
        page = tab.page
        expect(page.locator(".information-container .title")).to_contain_text(
            TITLE, timeout=RENDER_TIMEOUT_MS
        )
        paths = page.locator(".opblock-summary-path")
        expect(paths.filter(has_text=re.compile(r"^/predict$"))).to_have_count(1)
        expect(paths.filter(has_text="/v2/models/{model_name}/infer").first).to_be_visible()
        expect(page.locator(".opblock-summary-path", has_text="/router/promote-v2")).to_be_visible()
        assert tab.aborted == [], f"/docs needed other hosts: {tab.aborted}"
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


def test_redoc_renders_the_api_without_internet(server, browser):
    tab = OfflineTab(browser)
    try:
        tab.page.goto(f"{server.http}/redoc")
        page = tab.page
        expect(page.get_by_role("heading", name=TITLE, level=1)).to_be_visible(
            timeout=RENDER_TIMEOUT_MS
        )
        expect(
            page.get_by_role("heading", name="Score one customer (routed)", level=2)
        ).to_be_visible()
        expect(page.get_by_text("/predict", exact=True).first).to_be_attached()
        assert tab.aborted == [], f"/redoc needed other hosts: {tab.aborted}"
        assert tab.errors == [], tab.errors
    finally:
        tab.close()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_served_here_with_their_content_types(server, page):
    status, content_type, body = fetch(f"{server.http}{page}")
    assert status == 200
    assert content_type.startswith("text/html")
    html = body.decode()
    assert not re.search(r"https?://", html), "the page names another host"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    scripts = [a for a in assets if a.endswith(".js")]
    assert scripts, html
    expected_types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for asset in assets:
        url = urljoin(f"{server.http}{page}", asset)
        assert urlsplit(url).netloc == urlsplit(server.http).netloc, asset
        status, content_type, content = fetch(url)
        suffix = asset[asset.rfind(".") :]
        assert status == 200, asset
        assert content_type.split(";")[0] == expected_types[suffix], (asset, content_type)
        assert len(content) > 1000, asset


def test_docs_pages_and_assets_are_not_api_operations(server):
    _status, _type, body = fetch(f"{server.http}/openapi.json")
    paths = json.loads(body)["paths"]
    assert "/predict" in paths
    hidden = [p for p in paths if p in ("/docs", "/redoc") or p.startswith("/docs-assets")]
    assert hidden == []
