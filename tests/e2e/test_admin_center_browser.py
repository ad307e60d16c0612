"""The admin center in a real browser: Debian's chromium, headless, driven by Playwright.

One relay and one connector for the whole walk: sign in, publish an app from the page and
reach it through the relay, create and revoke a token, watch a stopped connector go
inactive, pause and resume a rollout, and see a cross-site form POST refused. A screenshot of each page goes to the
test's output directory (docs/admin-center.png is one of them).
"""

from __future__ import annotations

import os
import re
import socket
import threading

import pytest

from tests.e2e.harness import echoes, free_port

playwright_sync = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("needs Debian's chromium (tools/test-deps.sh)")
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _bulk_echoes(port: int, stop: threading.Event) -> None:
    """1 MiB echoed through the app at a time, until ``stop`` (bounded: 60 rounds)."""
    payload = os.urandom(1 << 20)
    for _ in range(60):
        if stop.is_set():
            return
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = 0
            while chunk := sock.recv(1 << 16):
                got += len(chunk)
        assert got == len(payload)
        stop.wait(0.2)


def test_the_admin_center_in_a_browser(system, backend, browser, tmp_path):
    expect = playwright_sync.expect
    shots = tmp_path / "screenshots"
    shots.mkdir()
    token = (system.data_dir / "admin.token").read_text().strip()
    echo = backend("echo")
    connector = system.start_connector("site-a")
    system.wait_tunnels("site-a", 2)

    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))

    # Without a session, every page leads to the sign-in page.
    page.goto(f"{system.url}/admin/connectors")
    assert page.url == f"{system.url}/admin/signin"
    page.screenshot(path=str(shots / "signin.png"))
    page.fill('input[name="token"]', "bha_wrong")
    page.click('button[type="submit"]')
    expect(page.locator(".error")).to_contain_text("not the admin token")
    page.fill('input[name="token"]', token)
    page.click('button[type="submit"]')
    expect(page.locator("h1")).to_have_text("Overview")
    cookie = {c["name"]: c for c in context.cookies()}["__Host-backhaul-admin"]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    page.screenshot(path=str(shots / "overview.png"), full_page=True)

    # Publish a TCP app from the page, and reach it through the relay.
    port = free_port()
    page.goto(f"{system.url}/admin/apps")
    page.click("details.panel summary")
    page.fill('#publish input[name="name"]', "browser-echo")
    page.select_option('#publish select[name="proto"]', "tcp")
    page.fill('#publish input[name="port"]', str(port))
    page.fill('#publish input[name="target"]', echo.target)
    page.click('#publish button[type="submit"]')
    expect(page.locator("#flash")).to_contain_text("Done")
    expect(page.locator('tr[data-app="browser-echo"]')).to_contain_text(f":{port}")
    system.wait_app(port)
    assert echoes(port, b"through the browser's app")
    # A refusal shows the API's own message.
    page.click('#publish button[type="submit"]')
    expect(page.locator("#flash.error")).to_contain_text("browser-echo")
    page.screenshot(path=str(shots / "apps.png"), full_page=True)

    # A token: created (its secret shown once), then revoked.
    page.goto(f"{system.url}/admin/tokens")
    page.click('#new-token button[type="submit"]')
    expect(page.locator("#secret")).to_be_visible()
    secret = page.locator("#secret-value").text_content()
    assert secret.startswith("bht_")
    (listed,) = system.api("/v1/tokens")
    row = page.locator(f'tr[data-token="{listed["id"]}"]')
    expect(row).to_be_visible()
    page.screenshot(path=str(shots / "tokens.png"), full_page=True)
    row.locator("button").click()
    expect(row).to_have_count(0)
    assert system.api("/v1/tokens") == []

    # Bytes through the connector show as its rate and chart, from the relay's own counters
    # (the connector's heartbeat counters would not move within this test).
    page.goto(f"{system.url}/admin/connectors")
    connector_row = page.locator('tr[data-connector="site-a"]')
    expect(connector_row.locator("td.status-active")).to_be_visible()
    stop_load = threading.Event()
    load = threading.Thread(target=_bulk_echoes, args=(port, stop_load), daemon=True)
    load.start()
    try:
        # A rate takes two samples and a chart three (sample_interval apart, on the live refresh).
        expect(connector_row.locator("td.traffic svg.chart")).to_be_visible(timeout=30_000)
        expect(connector_row.locator("td.traffic")).to_contain_text(re.compile(r"[KMG]B/s"), timeout=15_000)
    finally:
        stop_load.set()
        load.join(10)

    # A stopped connector goes inactive on the page by itself (the live refresh).
    connector.stop()
    expect(connector_row.locator("td.status-inactive")).to_be_visible(timeout=30_000)
    page.screenshot(path=str(shots / "connectors.png"), full_page=True)

    # A group's rollout paused and resumed from the page.
    page.goto(f"{system.url}/admin/releases")
    rollout = page.locator('tr[data-rollout="default"]')
    rollout.get_by_role("button", name="Pause").click()
    expect(rollout.get_by_role("button", name="Resume")).to_be_visible()
    assert {g["group"]: g["paused"] for g in system.api("/v1/rollout")}["default"] is True
    rollout.get_by_role("button", name="Resume").click()
    expect(rollout.get_by_role("button", name="Pause")).to_be_visible()
    assert {g["group"]: g["paused"] for g in system.api("/v1/rollout")}["default"] is False

    for name in ("groups", "releases", "log"):
        page.goto(f"{system.url}/admin/{name}")
        expect(page.locator("h1")).to_be_visible()
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    # The log view reads the relay's admin log file: the app published from the page is there.
    page.goto(f"{system.url}/admin/log?q=browser-echo")
    expect(page.locator("main")).to_contain_text("app published")
    expect(page.locator("main")).to_contain_text("admin.log")

    # A page of another site posting to the relay changes nothing.
    evil = context.new_page()
    evil.route("https://evil.example/**", lambda route: route.fulfill(content_type="text/html", body=(
        f'<form method="post" action="{system.url}/v1/groups" enctype="text/plain">'
        '<input name=\'{"name": "evil", "x": "\' value=\'"}\'></form>'
        "<script>document.forms[0].submit()</script>"
    )))
    with evil.expect_navigation(url=re.compile(re.escape(system.url))):
        evil.goto("https://evil.example/")
    assert "evil" not in {g["name"] for g in system.api("/v1/groups")}
    assert '"unauthorized"' in evil.content() or "cross_site" in evil.content()

    # The admin token was never in a URL the browser asked for.
    assert urls and not [u for u in urls if token in u]
    context.close()
