"""The operator's page (api/dashboard.py, api/static/): served safely, and live in a real headless Chromium.

The browser tests drive Debian's `chromium` with `chromium-driver` through Selenium against the real API (gunicorn
subprocess), a real worker on a simulated accelerator slow enough that a batch runs for several seconds, and
real Redis. They skip, saying why, where Chromium or its driver is missing (`.ci/run` installs both). Screenshots
go to `RAGQ_ARTIFACTS_DIR` when set, else to the test's tmp path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask.testing import FlaskClient

from api.dashboard import STATIC
from cli.redis_server import free_port
from shared.config import Settings
from shared.models import ModelSpec
from tests.helpers import child_env, start_worker, wait_for_api
from worker.simulated import write_spec_dir

API_START_TIMEOUT_S = 30
PAGE_TIMEOUT_S = 30
SIM_MODEL = "sim-dash"
API_KEY = "dashboard-test-key-0123456789"


# ---- served safely (no browser) ------------------------------------------------------------------------------


def test_the_root_redirects_to_the_dashboard(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 302 and response.headers["Location"] == "/dashboard"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/dashboard", "text/html"),
        ("/dashboard/static/dashboard.js", "text/javascript"),
        ("/dashboard/static/dashboard.css", "text/css"),
        ("/dashboard/static/favicon.svg", "image/svg+xml"),
    ],
)
def test_the_page_and_its_files_carry_a_self_only_content_security_policy(
    client: FlaskClient, path: str, content_type: str
) -> None:
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == content_type
    policy = dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert policy[directive] == "'self'", directive
    assert response.headers["X-Content-Type-Options"] == "nosniff" and response.headers["X-Frame-Options"] == "DENY"


def test_no_other_files_are_served(client: FlaskClient) -> None:
    # The app has no static route of its own; the blueprint serves api/static only.
    assert client.get("/static/dashboard.js").status_code == 404
    assert client.get("/dashboard/static/../dashboard.py").status_code == 404
    assert client.get("/dashboard/static/missing.js").status_code == 404


def test_the_page_needs_no_key_but_the_data_does(settings: Settings, redis_client: redis.Redis) -> None:
    from api import create_app

    keyed = create_app(dataclasses.replace(settings, api_keys=f"ops:{API_KEY}")).test_client()
    assert keyed.get("/dashboard").status_code == 200
    assert keyed.get("/v1/batches").status_code == 401


class _MarkupCheck(HTMLParser):
    """Collects what a strict CSP would block: inline scripts, style elements or attributes, event handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.local_refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and not names.get("src"):
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> element")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"{name}= on <{tag}>")
            if name in ("src", "href") and value and not value.startswith("/"):
                self.problems.append(f"{name}={value!r} is not on this origin")
            elif name in ("src", "href") and value:
                self.local_refs.append(value)


def test_the_page_has_no_inline_code_and_loads_only_its_own_files(client: FlaskClient) -> None:
    check = _MarkupCheck()
    check.feed((STATIC / "dashboard.html").read_text(encoding="utf-8"))
    assert check.problems == []
    for ref in check.local_refs:
        assert client.get(ref).status_code in (200, 302), ref


def test_the_script_renders_api_data_as_text_only() -> None:
    script = (STATIC / "dashboard.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


# ---- in a real browser ---------------------------------------------------------------------------------------


def _browser_paths() -> tuple[str, str]:
    """Chromium and its driver, or skip saying what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None]
        pytest.skip(f"{' and '.join(missing)} not on PATH: apt-get install chromium chromium-driver (.ci/run does)")
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium that keeps the page's console messages."""
    browser_path, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,900",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: RAGQ_ARTIFACTS_DIR (CI keeps it) or the test's tmp path."""
    configured = os.environ.get("RAGQ_ARTIFACTS_DIR")
    directory = Path(configured) if configured else tmp_path / "artifacts"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextmanager
def running_api(settings: Settings) -> Iterator[str]:
    """`python -m api` (gunicorn) on a free loopback port; yields its URL."""
    port = free_port()
    log_path = settings.data_dir / f"api-{port}.log"
    with log_path.open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "api"],
            env=child_env(settings, RAGQ_PORT=str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_api(url, api, API_START_TIMEOUT_S, log_path)
        yield url
    finally:
        api.terminate()
        api.wait(20)


def wait_for(condition: Callable[[], Any], timeout_s: float = PAGE_TIMEOUT_S, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def rows(driver: Any, prefix: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f'tr[data-key^="{prefix}"]')


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.slow
def test_the_dashboard_shows_a_running_batch_moving_and_its_worker(
    browser: Any, settings: Settings, redis_client: redis.Redis, tmp_path: Path, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    # About 1 s per microbatch of 4 (25 to 30 decode steps of 40 ms): 48 items run for about 12 s.
    directory = write_spec_dir(
        tmp_path / SIM_MODEL, "instant", step_base_ms=40.0, answer_min_tokens=25, answer_max_tokens=30
    )
    sim = dataclasses.replace(
        settings, extra_models=(*settings.extra_models, ModelSpec(SIM_MODEL, str(directory))), max_microbatch_size=4
    )
    worker = start_worker(sim, SIM_MODEL, redis_client)
    try:
        with running_api(sim) as url:
            lines = [{"custom_id": f"q{i}", "question": f"How do I run worker number {i}?"} for i in range(48)]
            response = requests.post(f"{url}/v1/batches", json={"requests": lines, "model": SIM_MODEL}, timeout=10)
            assert response.status_code == 202, response.text
            batch_id = response.json()["id"]

            browser.get(f"{url}/")
            assert browser.current_url == f"{url}/dashboard"
            row = wait_for(lambda: rows(browser, f"b:{batch_id}"), what="the batch's row")[0]
            bar = row.find_element(By.TAG_NAME, "progress")
            first = float(bar.get_property("value"))
            assert float(bar.get_property("max")) == 48 and first < 48
            # The same element moves: rows are updated in place, not rebuilt (no flicker).
            wait_for(lambda: float(bar.get_property("value")) > first, what="the progress bar to move")
            assert SIM_MODEL in row.text and "in_progress" in row.text
            # Its rate comes from /v1/models while it runs (the ETA with it, once the rate is known).
            rate_cell = row.find_elements(By.TAG_NAME, "td")[6]

            def has_rate() -> bool:
                return bool(re.fullmatch(r"\d+\.\d+", rate_cell.text)) and float(rate_cell.text) > 0

            wait_for(has_rate, what="the batch's rate")

            model_row = wait_for(lambda: rows(browser, f"m:{SIM_MODEL}"), what="the model's row")[0]
            assert SIM_MODEL in model_row.text
            worker_row = wait_for(lambda: rows(browser, f"w:{SIM_MODEL}:"), what="the worker's row")[0]
            cells = worker_row.find_elements(By.TAG_NAME, "td")
            assert cells[0].text and cells[1].text.startswith("ready"), "the worker's name and engine state"
            assert browser.find_elements(By.CSS_SELECTOR, "#chart polyline"), "the throughput chart"
            assert browser.find_element(By.ID, "status").text == "live"
            assert not browser.find_element(By.ID, "banner").is_displayed()
            assert re.fullmatch(r"updated \d+ s ago", browser.find_element(By.ID, "updated").text)

            def completed() -> bool:
                return "completed" in rows(browser, f"b:{batch_id}")[0].text

            wait_for(completed, timeout_s=120, what="the batch to complete")
            assert float(bar.get_property("value")) == 48
            browser.save_screenshot(str(artifacts / "dashboard.png"))
            assert console_errors(browser) == []
    finally:
        worker.stop()


@pytest.mark.slow
def test_with_keys_the_page_asks_for_one_and_says_when_it_is_refused(
    browser: Any, settings: Settings, redis_client: redis.Redis, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    with running_api(dataclasses.replace(settings, api_keys=f"ops:{API_KEY}")) as url:
        browser.get(f"{url}/dashboard")
        form = browser.find_element(By.ID, "key-form")
        wait_for(form.is_displayed, what="the key prompt")
        assert browser.find_element(By.ID, "status").text == "API key needed"
        assert not browser.find_element(By.ID, "content").is_displayed()

        key_input = browser.find_element(By.ID, "key-input")
        key_input.send_keys("not-the-right-key-at-all")
        browser.find_element(By.ID, "key-submit").click()
        error = browser.find_element(By.ID, "key-error")
        wait_for(error.is_displayed, what="the refusal")
        assert "refused" in error.text and "401" in error.text
        browser.save_screenshot(str(artifacts / "dashboard-key-refused.png"))

        key_input.send_keys(API_KEY)
        browser.find_element(By.ID, "key-submit").click()
        wait_for(lambda: not form.is_displayed(), what="the prompt to go")
        wait_for(lambda: rows(browser, "m:tiny-t5"), what="the models")
        assert browser.find_element(By.ID, "status").text == "live"
        assert browser.execute_script("return sessionStorage.getItem('ragq-api-key')") == API_KEY

        # The key stays for the tab: a reload needs no prompt; forgetting it brings the prompt back.
        browser.refresh()
        wait_for(lambda: rows(browser, "m:tiny-t5"), what="the models after a reload")
        assert not browser.find_element(By.ID, "key-form").is_displayed()
        browser.find_element(By.ID, "forget-key").click()
        wait_for(browser.find_element(By.ID, "key-form").is_displayed, what="the prompt after forgetting the key")
        assert browser.execute_script("return sessionStorage.getItem('ragq-api-key')") is None
        # Only the expected refusals of requests made without a valid key reach the console.
        unexpected = [e for e in console_errors(browser) if "401" not in e["message"]]
        assert unexpected == []


@pytest.mark.slow
def test_an_api_error_is_shown_in_a_banner_and_the_figures_are_dimmed(
    browser: Any, settings: Settings, redis_client: redis.Redis
) -> None:
    from selenium.webdriver.common.by import By

    # Two requests per refresh: the third refresh of the minute is refused with 429.
    with running_api(dataclasses.replace(settings, rate_limit_per_min=4)) as url:
        browser.get(f"{url}/dashboard")
        banner = browser.find_element(By.ID, "banner")
        wait_for(banner.is_displayed, what="the error banner")
        assert "429 too_many_requests" in banner.text and "/v1/models" in banner.text
        assert browser.find_element(By.ID, "status").text == "error"
        content = browser.find_element(By.ID, "content")
        assert "dimmed" in content.get_attribute("class")
        # The figures of the refreshes that worked stay on the page.
        assert rows(browser, "m:tiny-t5")
        assert [e for e in console_errors(browser) if "429" not in e["message"]] == []


@pytest.mark.slow
def test_markup_in_api_data_is_shown_as_text_and_never_runs(
    browser: Any, settings: Settings, redis_client: redis.Redis
) -> None:
    from selenium.webdriver.common.by import By

    from shared import redis_keys

    # A failure record as a worker writes it, every field holding markup (messages can quote inputs).
    payload = "<img src=/x onerror=\"window.pwned=1\"><script>window.pwned=1</script><b>bold</b>"
    failure = {"job_id": payload, "batch_id": payload, "type": "<i>generation_error</i>", "message": payload}
    failure["at"] = time.time()
    redis_client.lpush(redis_keys.tenant_failures("local", "tiny-t5"), json.dumps(failure))
    with running_api(settings) as url:
        browser.get(f"{url}/dashboard")
        row = wait_for(lambda: rows(browser, "f:"), what="the failure's row")[0]
        assert payload in row.text and "<i>generation_error</i>" in row.text
        assert row.find_elements(By.CSS_SELECTOR, "img, script, b, i") == []
        assert browser.execute_script("return window.pwned === undefined")
        assert console_errors(browser) == []
