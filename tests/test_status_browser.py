"""
The status page in a real headless Chromium (Debian's C{chromium} and
C{chromium-driver}), driven with Selenium through chromedriver.

Selenium rather than the DevTools protocol by hand: chromedriver comes from
the same Debian source package as Chromium (so their versions always
match), and Selenium gives the console log (C{goog:loggingPrefs}), window
sizes and screenshots without a WebSocket client of our own.  Selenium is
blocking, so every browser call runs in a thread (C{deferToThread}) while
the reactor keeps serving the page, the JSON and the health checks.

The page is served by a real L{AdminSite} on 127.0.0.1 with a real
L{StateOverlay} fed by a real L{HealthChecker} (TCP checks every 0.2 s)
against a real fake backend: the test stops that backend, the checks fail,
and the page -- the same page, never reloaded -- shows it as down.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, cast

import pytest
import pytest_twisted
from faultkit import Echo, listen, wait_until
from mmdbwriter import write_mmdb
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from edgeproxy.control.admin import AdminRoot, AdminSite
from edgeproxy.control.status import StatusData, StatusResource, mount_status
from edgeproxy.geo import GeoIPResolver
from edgeproxy.interfaces import UNAVAILABLE
from edgeproxy.net.admission import Admission
from edgeproxy.net.health import HealthChecker
from edgeproxy.routing.admin import AdminState, AdminStates
from edgeproxy.routing.breaker import CircuitBreaker
from edgeproxy.testing import (
    BindingTable,
    InMemoryBackendRepository,
    LoadTable,
    MetricsStore,
    StateOverlay,
    backend,
)

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs Chromium and its driver: apt-get install chromium chromium-driver",
        allow_module_level=True,
    )

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs Selenium: pip install 'selenium>=4.11'"
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)

#: Seconds any one wait in the browser may take (the page polls every 2 s).
WAIT = 30.0

#: A backend id that would be markup if the page inserted it as HTML.
EVIL = '<img src=x onerror="window.pwned=1">'


def _start_browser(profile: Path) -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    driver.set_window_size(1280, 900)
    return driver


#: The status cell and the other texts of a backend's row, by its id (read
#: from the row's data-id attribute, so an id of any characters works).
ROW = """
var id = arguments[0];
var row = Array.from(document.querySelectorAll("#backend-rows tr"))
  .find(function (tr) { return tr.getAttribute("data-id") === id; });
if (!row) { return null; }
var cells = {};
row.querySelectorAll("td").forEach(function (td) { cells[td.className] = td.textContent; });
return {status: row.getAttribute("data-status"), cells: cells,
        images: row.querySelectorAll("img").length};
"""


class Page:
    """
    The browser side, called from a thread.
    """

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.console: List[Dict[str, Any]] = []

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def row(self, backend_id: str) -> Any:
        return self.js(ROW, backend_id)

    def wait(self, predicate: Callable[[], Any], what: str) -> Any:
        return WebDriverWait(self.driver, WAIT, poll_frequency=0.1).until(
            lambda _: predicate(), message=what
        )

    def wait_status(self, backend_id: str, status: str) -> Any:
        def shown() -> Any:
            row = self.row(backend_id)
            return row if row is not None and row["status"] == status else None

        return self.wait(shown, f"{backend_id} shown as {status}")

    def drain_console(self) -> List[Dict[str, Any]]:
        entries = list(self.driver.get_log("browser"))
        self.console.extend(entries)
        return entries

    def screenshot(self, path: Path, width: int) -> None:
        # The whole page: the window's height is the page's plus the
        # browser's own (headless Chromium keeps some).
        height, chrome = self.js(
            "return [document.documentElement.scrollHeight,"
            " window.outerHeight - window.innerHeight]"
        )
        self.driver.set_window_size(width, max(int(height) + int(chrome), 600))
        assert self.driver.save_screenshot(str(path))


class Repository(InMemoryBackendRepository):
    """
    An in-memory routing table with the SQLite repository's reload
    bookkeeping: loaded once, now.
    """

    def __init__(self, backends: Any) -> None:
        InMemoryBackendRepository.__init__(self, backends)
        self.lastReloadOk = cast(Any, reactor).seconds()
        self.lastError = None
        self.skipped = ()


class CountingPage(StatusResource):
    """
    The status page, counting how often it was fetched.
    """

    loads = 0

    def render_GET(self, request: Any) -> bytes:
        self.loads += 1
        return StatusResource.render_GET(self, request)


def _in_reactor_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@pytest_twisted.inlineCallbacks
def test_status_page_in_chromium(tmp_path: Path, capsys: Any) -> Any:
    """
    In a real headless Chromium, the status page shows a backend as up,
    then -- after its health check fails, without a reload (the page was
    fetched once and a marker set by script survives) -- as down with the
    check's reason; it escapes a backend id made of markup, shows the geo
    mix, fits a 390 px wide phone screen without horizontal scrolling,
    shows a banner when a poll fails, shows a stale GeoIP database with its
    build date, and logs no JavaScript error to the console.  Screenshots
    go to C{tmp_path} (paths printed).
    """
    alive = listen(reactor, Echo)
    spare = listen(reactor, Echo)
    repository = Repository(
        [
            backend("gru-1", port=alive.port, soft_limit=10, hard_limit=20),
            backend("cdg-1", region="eu", country="FR", port=spare.port, soft_limit=50),
            backend("iad-1", region="us", country="US", host="fd00::1", health_check="off"),
            backend(EVIL, region="ap", country="JP", health_check="off"),
        ]
    )
    overlay = StateOverlay()
    admin = AdminStates(overlay)
    admin.set("iad-1", AdminState("maint", reason="disk swap"))
    breaker = CircuitBreaker(overlay, reactor)
    bindings = BindingTable()
    bindings.bind(("192.0.2.1", None), "gru-1", 0.0)
    load = LoadTable()
    for _ in range(7):
        load.acquire(repository.current().by_id["gru-1"])
    metrics = MetricsStore()
    admission = Admission(1000, metrics)
    for _ in range(7):
        admission.acceptPeer(None)
    checker = HealthChecker(reactor, overlay, interval=0.2, timeout=1.0, rise=1, fall=1)
    checker.update(repository.current())
    checker.start()
    geodb = GeoIPResolver.fromPaths(
        write_mmdb(
            str(tmp_path / "old.mmdb"),
            [("8.8.8.0/24", {"country_code": "US"})],
            database_type="country",
            build_epoch=int(time.time()) - 100 * 86400,
        ),
        maxAge=60 * 86400,
    )
    assert geodb.database is not None
    data = StatusData(
        geo=geodb,
        repository=repository,
        load=load,
        overlay=overlay,
        checker=checker,
        breaker=breaker,
        admin=admin,
        bindings=bindings,
        admission=admission,
        metrics=metrics,
        region="sa",
        clock=cast(Any, reactor).seconds,
    )
    # Routing decisions since the data's first sample: the geo mix.
    for tier, n in (("0", 30), ("1", 8), ("3", 2)):
        metrics.increment("routing_decisions", tier, n)
    for country, n in (("BR", 25), ("AR", 10), ("US", 5)):
        metrics.increment("routing_client_countries", country, n)
    root = AdminRoot()
    _, status_json = mount_status(root, data)
    page = CountingPage()
    root.putChild(b"", page)
    site = AdminSite(root, reactor=reactor)
    listening = cast(Any, reactor).listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{listening.getHost().port}/"
    driver: Any = None
    try:
        driver = yield deferToThread(_start_browser, tmp_path / "profile")
        browser = Page(driver)
        yield wait_until(reactor, lambda: checker.state("gru-1") == "up", timeout=WAIT)

        def shows_up() -> Any:
            assert not _in_reactor_thread()
            driver.get(url)
            row = browser.wait_status("gru-1", "up")
            browser.js("window.__statusMarker = 'same page';")
            return row

        up = yield deferToThread(shows_up)
        assert up["cells"]["c-routable"] == "yes"
        assert up["cells"]["c-load"].startswith("7 / 10 / 20")
        assert up["cells"]["c-address"] == f"127.0.0.1:{alive.port}"
        polls_before = yield deferToThread(browser.js, "return window.edgeproxyStatus.ok")

        # The backend dies: its health check fails (connection refused) and
        # the checker sets its overlay verdict, on the reactor thread.
        yield alive.stop()
        yield wait_until(reactor, lambda: overlay.sources("gru-1").get("health") == UNAVAILABLE)

        down = yield deferToThread(browser.wait_status, "gru-1", "down")
        assert down["cells"]["c-routable"] == "no"
        assert "connection refused" in down["cells"]["c-health"]
        marker, polls_after = yield deferToThread(
            browser.js, "return [window.__statusMarker, window.edgeproxyStatus.ok]"
        )
        assert marker == "same page"
        assert polls_after > polls_before
        assert page.loads == 1
        assert status_json.renders >= 2

        evil = yield deferToThread(browser.row, EVIL)
        assert evil is not None and evil["cells"]["c-id"] == EVIL
        assert evil["images"] == 0
        assert (yield deferToThread(browser.js, "return window.pwned === undefined"))
        geo = yield deferToThread(
            browser.js,
            "return [document.getElementById('tier-rows').textContent,"
            " document.getElementById('country-rows').textContent,"
            " document.getElementById('geo').hidden]",
        )
        assert "same country" in geo[0] and "75 %" in geo[0]
        assert "BR" in geo[1] and "63 %" in geo[1]
        assert geo[2] is False
        region = yield deferToThread(
            browser.js, "return document.getElementById('region').textContent"
        )
        assert region == "region sa"
        maint = yield deferToThread(browser.row, "iad-1")
        assert maint["status"] == "maint" and "disk swap" in maint["cells"]["c-admin"]
        cards = yield deferToThread(
            browser.js, "return document.querySelector('.cards').textContent"
        )
        assert "of 1000 allowed" in cards and "reloads ok" in cards
        assert f"GeoIP database built\n{geodb.database.builtDate}" in cards
        assert "STALE: 100" in cards and "over the 60-day limit" in cards

        errors = yield deferToThread(browser.drain_console)
        assert [e for e in errors if e["level"] == "SEVERE"] == []

        desktop = tmp_path / "status.png"
        yield deferToThread(browser.screenshot, desktop, 1280)

        def phone() -> Any:
            driver.set_window_size(390, 844)
            browser.wait(
                lambda: browser.js("return window.innerWidth") <= 390, "a phone-sized window"
            )
            return browser.js(
                "var d = document.documentElement;"
                "return {scroll: d.scrollWidth, width: window.innerWidth,"
                " body: document.body.scrollWidth,"
                " widest: Math.max.apply(null, Array.from("
                "   document.querySelectorAll('#backend-rows td')).map("
                "   function (td) { return td.getBoundingClientRect().right; }))}"
            )

        sizes = yield deferToThread(phone)
        assert sizes["scroll"] <= sizes["width"], sizes
        assert sizes["body"] <= sizes["width"], sizes
        assert sizes["widest"] <= sizes["width"], sizes
        mobile = tmp_path / "status-phone.png"
        yield deferToThread(browser.screenshot, mobile, 390)

        # A poll that fails shows the banner; the last data stays.
        def broken() -> Dict[str, Any]:
            raise RuntimeError("the status page test breaks the JSON on purpose")

        data.render = broken  # type: ignore[method-assign]

        def banner() -> Any:
            return browser.wait(
                lambda: browser.js(
                    "var b = document.getElementById('error');"
                    "return b.hidden ? null : b.textContent;"
                ),
                "the error banner",
            )

        text = yield deferToThread(banner)
        assert "HTTP 500" in text
        still = yield deferToThread(browser.row, "gru-1")
        assert still is not None and still["status"] == "down"
        late = yield deferToThread(browser.drain_console)
        # The failed fetches are logged by the browser as network errors;
        # nothing else, and no JavaScript error.
        assert all(
            e["source"] == "network" and "/api/v1/status" in e["message"]
            for e in late
            if e["level"] == "SEVERE"
        ), late
        assert not [e for e in browser.console if e["source"] == "javascript"]
        assert page.loads == 1
        with capsys.disabled():
            print(f"\nstatus page screenshots: {desktop} {mobile}")
    finally:
        checker.stop()
        breaker.stop()
        if driver is not None:
            yield deferToThread(driver.quit)
        yield listening.stopListening()
        yield spare.stop()
        yield _stop_quietly(alive)


@inlineCallbacks
def _stop_quietly(fake: Any) -> Any:
    if fake.listening.connected:
        yield fake.stop()
