"""The console in a real browser: Debian's headless Chromium driven by Selenium against a farm with a real Celery
worker and the API in its own process. Sign in, watch a training job's chart gain points, cancel a job, open an
adapter, download one of its files and check its sha256. A screenshot is kept under tests/artifacts/."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from farm import service
from tests.test_cli_end_to_end import running_api
from tests.test_end_to_end import write_spec

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
TOKENS = {"ui": "tok-ui-3c8e51f0a27d94b6"}

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
           "apt-get install -y chromium chromium-driver (.ci/setup does)")


@pytest.fixture
def console_url(farm_stack):
    with running_api(farm_stack, {"FARM_API_TOKENS": json.dumps(TOKENS)}) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1100"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    from selenium.common.exceptions import StaleElementReferenceException

    while time.monotonic() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:  # the live table re-rendered the element between find and read
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def save_screenshot(driver, tmp_path, name: str) -> Path:
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    print(f"screenshot: {ARTIFACTS / name}")
    return shot


def test_sign_in_watch_the_chart_cancel_open_an_adapter_and_download_a_file(farm_stack, console_url, browser,
                                                                             tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By

    from farm.tiny import write_dataset

    settings = farm_stack.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=32, seed=3)
    quick = service.submit_job(write_spec(tmp_path / "quick.yaml", tiny_model_dir, data, max_steps=4), settings=settings)
    long_spec = write_spec(tmp_path / "long.yaml", tiny_model_dir, data, max_steps=400)
    long_spec.write_text(long_spec.read_text().replace("name: e2e-bot", "name: long-bot"))
    long = service.submit_job(long_spec, settings=settings)
    farm_stack.start_worker()

    # sign in: the sign-in page is the only one a stranger sees
    browser.get(f"{console_url}/ui/jobs/{long.id}")
    assert "/ui/login" in browser.current_url
    browser.find_element(By.ID, "token").send_keys(TOKENS["ui"])
    browser.find_element(By.ID, "sign-in").click()
    wait_until(lambda: f"/ui/jobs/{long.id}" in browser.current_url, 20, "the redirect back to the job page")
    cookie = browser.get_cookie("farm_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKENS["ui"] not in cookie["value"]

    # the long job's chart gains points live while it trains (server-sent events, no reload)
    wait_until(lambda: service.get_job(long.id, settings=settings).state == "running", 300,
               f"the long job to start; worker log:\n{farm_stack.worker_logs()}")
    browser.get(f"{console_url}/ui/jobs/{long.id}")
    chart = browser.find_element(By.ID, "chart-loss")
    first = int(chart.get_attribute("data-points"))
    wait_until(lambda: int(chart.get_attribute("data-points")) >= first + 3, 120, "the chart to gain points")
    assert browser.find_element(By.ID, "job-state").text == "running"
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-loss path.series-loss")
    save_screenshot(browser, tmp_path, "console-job-training.png")

    # a second tab on the jobs table, which updates itself (server-sent events)
    job_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(f"{console_url}/ui/jobs")
    table_tab = browser.current_window_handle
    row = f"#job-rows tr[data-job='{long.id}']"
    wait_until(lambda: browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "running", 20,
               "the jobs table to show the long job running")

    # cancel it from its page; the table in the other tab follows without a reload
    browser.switch_to.window(job_tab)
    browser.find_element(By.ID, "cancel").click()
    browser.switch_to.alert.accept()
    wait_until(lambda: browser.find_elements(By.ID, "notice"), 20, "the cancel notice")
    final = service.wait_for_job(long.id, timeout=120, settings=settings)
    assert final.state == "cancelled"
    browser.switch_to.window(table_tab)
    wait_until(lambda: browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "cancelled", 20,
               "the live jobs table to show the cancel")
    browser.close()
    browser.switch_to.window(job_tab)
    browser.refresh()
    assert browser.find_element(By.ID, "job-state").text == "cancelled" and not browser.find_elements(By.ID, "cancel")

    # the quick job published an adapter: find it from the jobs table, open it, download a file
    done = service.wait_for_job(quick.id, timeout=300, settings=settings)
    assert done.state == "succeeded", (done.error, farm_stack.worker_logs())
    browser.get(f"{console_url}/ui/jobs")
    wait_until(lambda: {r.get_attribute("data-state") for r in browser.find_elements(
        By.CSS_SELECTOR, "#job-rows tr[data-job]")} == {"succeeded", "cancelled"}, 20, "the table to show both jobs ended")
    browser.find_element(By.LINK_TEXT, "Adapters").click()
    browser.find_element(By.CSS_SELECTOR, "a.version[href='/ui/adapters/e2e-bot/1']").click()
    assert browser.find_element(By.ID, "model-card").find_elements(By.TAG_NAME, "h1")
    assert browser.find_elements(By.CSS_SELECTOR, "#lineage svg .lineage-node[data-relation='self']")
    link = browser.find_element(By.CSS_SELECTOR, "a.download[href$='/adapter_model.safetensors']")
    expected = link.get_attribute("data-sha256")
    catalog = {f.path: f.sha256 for f in service.get_adapter("e2e-bot:1", settings=settings).files}
    assert expected == catalog["adapter_model.safetensors"]
    save_screenshot(browser, tmp_path, "console-adapter.png")
    link.click()
    target = browser.downloads / "adapter_model.safetensors"
    wait_until(lambda: target.exists() and not list(browser.downloads.glob("*.crdownload")), 30, "the download")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected

    browser.find_element(By.LINK_TEXT, "Workers").click()
    assert "farm.cpu" in browser.find_element(By.ID, "workers").text
