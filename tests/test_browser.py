"""The customer's status page and the admin dashboard in real headless Chromium, against the
real stack: Temporal dev server, in-process worker, the emulator, the API on a loopback port.

Selenium blocks, and the worker runs on this test's event loop: every browser step goes
through asyncio.to_thread so the worker keeps working meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ADMIN_KEY, png_bytes
from tests.helpers import order, wait_for_status
from worker import create_worker
from workflows.upscale import UpscaleWorkflow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALLER = Path(__file__).resolve().parent.parent / ".ci" / "install-chromium"
# No first-run screens, no calls home, no updates: the browser only talks to our loopback servers.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]  # no name resolves: loopback only
STEP_TIMEOUT = 90  # seconds; the machine is small and shared


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium from Debian's packages, installed by .ci/install-chromium when missing.
    A browser that cannot be had fails the test: skipping would hide that the UI went untested."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        subprocess.run(["bash", str(INSTALLER)], check=True, timeout=1200)
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), f"{INSTALLER} did not install {CHROMIUM} and {CHROMEDRIVER}"
    options = Options()
    options.binary_location = str(CHROMIUM)  # with the driver's path below, Selenium Manager downloads nothing
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(STEP_TIMEOUT)
    yield driver
    driver.quit()


def in_browser(step, *args):
    return asyncio.to_thread(step, *args)


def body(driver, name: str) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute(f"data-{name}")


def wait_until(driver, condition, timeout: float = STEP_TIMEOUT):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def stage_reached(status: str):
    return lambda driver: body(driver, "status") == status


def csp_violations(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if "Content Security Policy" in entry["message"]]


def open_status_page(driver, url: str) -> tuple[str, str]:
    driver.get(url)
    driver.execute_script("window.sameDocument = true")  # gone if the page reloads: updates must come live
    return body(driver, "status"), body(driver, "transport")


def download_by_click(driver, folder: Path) -> bytes:
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    driver.find_element(By.ID, "download").click()
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if not p.name.endswith(".crdownload")]
        if done:
            return done[0].read_bytes()
        time.sleep(0.2)
    raise AssertionError("the download did not finish")


def log_in(driver, base_url: str) -> None:
    driver.get(f"{base_url}/admin")
    assert driver.current_url == f"{base_url}/admin/login"  # no session yet: sent to the form
    driver.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    driver.find_element(By.ID, "login").click()
    wait_until(driver, lambda d: d.current_url == f"{base_url}/admin")


def count_of(driver, status: str) -> int:
    return int(driver.find_element(By.CSS_SELECTOR, f'[data-status-count="{status}"]').text)


def review_rows(driver) -> list[str]:
    return [row.get_attribute("data-job") for row in driver.find_elements(By.CSS_SELECTOR, "#review tr[data-job]")]


def click_retry(driver, job_id: str) -> str:
    driver.find_element(By.CSS_SELECTOR, f'#review tr[data-job="{job_id}"] button.retry').click()
    return wait_until(driver, lambda d: d.find_elements(By.ID, "notice") and d.find_element(By.ID, "notice").text)


def open_without_event_source(driver, url: str) -> tuple[str, str]:
    """As in a browser without EventSource: the page must fall back to polling."""
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.EventSource;"})
    try:
        return open_status_page(driver, url)
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


async def wait_awaiting_decision(env, job_id: str) -> None:
    handle = env.client.get_workflow_handle_for(UpscaleWorkflow.run, f"upscale-{job_id}")
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:  # the job row says manual_review a moment before the workflow waits
        if (await handle.query(UpscaleWorkflow.state)).awaiting_decision:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the workflow never waited for a decision")


async def test_status_page_and_dashboard_in_chromium(dev_env, stack_factory, faults, browser, tmp_path):
    faults(delay_seconds=4)  # slow enough to open the page before the job is done
    stack = stack_factory(dev_env)
    client = stack.client()
    base = stack.api.url
    async with create_worker(dev_env.client, stack.settings):
        # (a) The customer watches the order finish live (Server-Sent Events), then downloads it.
        created = (
            await asyncio.to_thread(
                client.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(60, 40)), "br-live")
            )
        ).json()
        job_id = created["job_id"]
        first, transport = await in_browser(open_status_page, browser, created["status_page_url"])
        assert first in {"received", "queued", "processing"} and transport == "sse"
        await in_browser(wait_until, browser, stage_reached("completed"))
        assert await in_browser(browser.execute_script, "return window.sameDocument === true")  # no reload
        link = await in_browser(browser.find_element, By.ID, "download")
        assert await in_browser(link.is_displayed)
        job = (await asyncio.to_thread(client.get, f"/v1/jobs/{job_id}")).json()
        assert await in_browser(link.get_attribute, "href") == job["download_url"]
        (tmp_path / "downloads").mkdir()
        downloaded = await in_browser(download_by_click, browser, tmp_path / "downloads")
        assert hashlib.sha256(downloaded).hexdigest() == job["output"]["sha256"]
        assert Image.open(io.BytesIO(downloaded)).size == (240, 160)
        stages = await in_browser(browser.find_elements, By.CSS_SELECTOR, "#stages li")
        assert [await in_browser(s.get_attribute, "data-state") for s in stages] == ["done"] * 5
        page_text = await in_browser(lambda: browser.find_element(By.TAG_NAME, "body").text)
        assert "ana@example.com" not in page_text and "Ana" not in page_text

        # (b) The admin logs in and sees it counted as completed.
        await in_browser(log_in, browser, base)
        assert await in_browser(count_of, browser, "completed") == 1

        # (c) A job Upsampler fails twice waits in manual review; the admin's Retry sends it on.
        faults(fail_with="model crashed", delay_seconds=0.1)
        created = (
            await asyncio.to_thread(
                client.post, "/v1/jobs", json=order(stack.shop.publish(png_bytes(60, 40)), "br-review")
            )
        ).json()
        review_id = created["job_id"]
        await wait_for_status(client, review_id, {"manual_review"}, timeout=STEP_TIMEOUT)
        await wait_awaiting_decision(dev_env, review_id)
        await in_browser(browser.refresh)
        assert await in_browser(review_rows, browser) == [review_id]
        assert await in_browser(count_of, browser, "manual_review") == 1

        faults(delay_seconds=3)  # Upsampler works again, slowly enough to watch the retry
        notice = await in_browser(click_retry, browser, review_id)
        assert f"Retry of job {review_id}: signalled the waiting workflow" in notice

        # The customer's page without EventSource polls instead, and still sees the job finish.
        first, transport = await in_browser(open_without_event_source, browser, created["status_page_url"])
        assert first != "completed" and transport == "poll"
        await in_browser(wait_until, browser, stage_reached("completed"))
        assert await in_browser(browser.execute_script, "return window.sameDocument === true")
        assert await in_browser(lambda: browser.find_element(By.ID, "download").is_displayed())
        await dev_env.client.get_workflow_handle(f"upscale-{review_id}").result()

        await in_browser(browser.get, f"{base}/admin")
        assert await in_browser(review_rows, browser) == []
        assert await in_browser(count_of, browser, "completed") == 2
        assert await in_browser(csp_violations, browser) == []  # our own inline script and styles were allowed
