"""The web page and the API docs in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium), against the running service, offline."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers import API_KEY, encode_image, photo, small_jpeg
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go (the test's output folder)."""
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    assert CHROMIUM and DRIVER, "install Debian's chromium and chromium-driver (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1200,1600",
        "--disable-gpu",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def direct(tiny_dir: Path) -> Entailer:
    return Entailer(load_checkpoint(tiny_dir), device="cpu")


def requested_urls(driver: WebDriver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def wait_for(driver: WebDriver, css: str, timeout: float = 60):
    return WebDriverWait(driver, timeout).until(
        EC.visibility_of_element_located((By.CSS_SELECTOR, css))
    )


def set_key(driver: WebDriver) -> None:
    driver.find_element(By.ID, "api-key").send_keys(API_KEY)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    WebDriverWait(driver, 10).until(lambda d: "Key set" in d.find_element(By.ID, "key-state").text)


def test_page_checks_a_photo_offline(browser, api, worker, direct, shots, tmp_path):
    browser.get_log("performance")  # start afresh
    browser.get(api + "/")
    assert "Does this image support this sentence?" in browser.title + browser.page_source
    set_key(browser)
    image = tmp_path / "cat.jpg"
    image.write_bytes(encode_image(photo("chelsea").resize((120, 80))))
    browser.find_element(By.ID, "image-file").send_keys(str(image))
    browser.find_element(By.ID, "text").send_keys("A cat lies on a sofa.")
    browser.find_element(By.ID, "check-button").click()
    verdict = wait_for(browser, "#result .verdict")
    want = direct.predict(image.read_bytes(), "A cat lies on a sofa.")
    assert verdict.get_attribute("data-label") == want.label
    for label in ("entailment", "contradiction", "neutral"):
        meter = browser.find_element(By.CSS_SELECTOR, f'[aria-label="{label} probability"]')
        assert float(meter.get_attribute("aria-valuenow")) == pytest.approx(
            want.probabilities[label], abs=1e-4
        )
    assert "computed" in verdict.text
    assert "A cat lies on a sofa." in browser.find_element(By.ID, "history").text
    browser.save_screenshot(str(shots / "check.png"))
    # Nothing left the machine: every request went to the API itself.
    hosts = {urlsplit(u).netloc for u in requested_urls(browser) if u.startswith("http")}
    assert hosts == {urlsplit(api).netloc}, hosts


def test_page_shows_the_problem_detail(browser, api, shots, tmp_path):
    browser.get(api + "/")
    set_key(browser)  # each test on its own: not relying on an earlier test's key
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an image at all")
    browser.find_element(By.ID, "image-file").send_keys(str(bad))
    browser.find_element(By.ID, "text").send_keys("anything")
    browser.find_element(By.ID, "check-button").click()
    problem = wait_for(browser, "#result .problem")
    assert "Unsupported image format" in problem.text and "HTTP 415" in problem.text
    assert "not an image format we can read" in problem.text
    browser.save_screenshot(str(shots / "problem.png"))


def test_page_runs_a_scan_with_progress_and_report(
    browser, api, worker, coordinator, shots, tmp_path
):
    browser.get(api + "/")
    set_key(browser)
    rows = []
    for i, gold in enumerate(["entailment", "contradiction", "neutral", None]):
        data = "data:image/jpeg;base64," + base64.b64encode(small_jpeg(seed=4000 + i)).decode()
        row = {"id": f"w{i}", "image": data, "text": f"web scan {i}"}
        if gold:
            row["label"] = gold
        rows.append(row)
    manifest = tmp_path / "web.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    browser.find_element(By.ID, "manifest").send_keys(str(manifest))
    browser.find_element(By.ID, "scan-button").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '.scan-progress[data-status="succeeded"]')
    )
    progress = browser.find_element(By.CSS_SELECTOR, ".scan-progress")
    assert "4 of 4 rows" in progress.text and "failed 0" in progress.text
    report = wait_for(browser, ".report h3")
    assert "over 3 labelled rows" in report.text
    browser.switch_to.frame(browser.find_element(By.CSS_SELECTOR, ".report iframe"))
    assert browser.find_elements(By.CSS_SELECTOR, "svg[aria-label^='Confusion matrix']")
    browser.switch_to.default_content()
    browser.save_screenshot(str(shots / "scan.png"))


def test_docs_render_authorize_and_try_it_out(browser, api, worker, shots, tmp_path):
    browser.get_log("performance")
    browser.get(api + "/docs")
    wait_for(browser, ".swagger-ui .info")
    browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    # The dialog offers both schemes; fill the X-API-Key one.
    field = wait_for(browser, ".modal-ux input[type=text], .modal-ux input[type=password]")
    inputs = browser.find_elements(By.CSS_SELECTOR, ".modal-ux input")
    for box in inputs:
        box.send_keys(API_KEY)
    for button in browser.find_elements(By.CSS_SELECTOR, ".modal-ux button.authorize"):
        button.click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.btn-done").click()
    assert field is not None
    browser.find_element(
        By.CSS_SELECTOR, "#operations-jobs-post_job_v1_jobs_post .opblock-summary"
    ).click()
    wait_for(browser, "#operations-jobs-post_job_v1_jobs_post button.try-out__btn").click()
    op = browser.find_element(By.ID, "operations-jobs-post_job_v1_jobs_post")
    image = tmp_path / "docs.jpg"
    image.write_bytes(small_jpeg(seed=4100))
    op.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image))
    text_box = op.find_element(By.CSS_SELECTOR, "tr[data-property-name='text'] input")
    text_box.clear()
    text_box.send_keys("tried from the docs")
    op.find_element(By.CSS_SELECTOR, "button.execute").click()
    live = "#operations-jobs-post_job_v1_jobs_post .live-responses-table .response-col_status"

    def answered(driver: WebDriver) -> str | None:
        codes = [c.text.strip() for c in driver.find_elements(By.CSS_SELECTOR, live)]
        return next((c for c in codes if c.isdigit()), None)

    code = WebDriverWait(browser, 60).until(answered)
    browser.save_screenshot(str(shots / "docs.png"))
    assert code in ("200", "202"), code
    hosts = {urlsplit(u).netloc for u in requested_urls(browser) if u.startswith("http")}
    assert hosts == {urlsplit(api).netloc}, hosts


def test_redoc_renders_every_operation_and_schema(browser, api, shots):
    """ReDoc (vendored, offline) reads the whole OpenAPI document: every operation's
    summary is listed and the request schemas render, with no error page."""
    spec = httpx.get(api + "/openapi.json").json()
    assert "$defs" not in json.dumps(spec)  # ReDoc refuses "#/$defs/..." references
    browser.get(api + "/redoc")
    wait_for(browser, "[data-section-id^='operation/']")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Something went wrong" not in page
    summaries = [
        op["summary"] for item in spec["paths"].values() for op in item.values() if "summary" in op
    ]
    shown = browser.find_elements(By.CSS_SELECTOR, "[data-section-id^='operation/']")
    assert len(shown) == len(summaries), (len(shown), len(summaries))
    for summary in summaries:
        assert summary in page, summary
    browser.save_screenshot(str(shots / "redoc.png"))
