"""The dashboard in a real browser, on a live server with its training worker and the demo
model: the key typed once per tab, the jobs page, a job's chart drawing its real loss points
and gaining points while it trains, a bad upload's line errors, the playground streaming
both answers, and text from users and models shown as text."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from afina.api.app import create_app
from afina.core.settings import Settings
from afina.core.storage import adapter_key
from afina.models import JobStatus
from afina.models.schema import upgrade_database
from afina.serving.protocol import Delta, Finished, Started, Usage
from tests.browser.conftest import screenshot
from tests.e2e.conftest import stack_settings, worker_process
from tests.e2e.test_training import arithmetic
from tests.support import add_rows, job_row, serve_in_thread

KEY = "browser-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live afina with a worker, keyed (the dashboard asks for the key once)."""
    settings = stack_settings(
        database_url, tmp_path_factory.mktemp("dashboard"), api_keys=[f"default:{KEY}"]
    )
    with worker_process(settings), serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers=HEADERS, timeout=60) as client:
        yield client


def upload(http: httpx.Client, content: bytes, name: str = "train.jsonl") -> dict:
    response = http.post(
        "/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, content)}
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(http: httpx.Client, job_id: str, until=("succeeded", "failed", "cancelled")):
    deadline = time.monotonic() + 120
    while (job := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in until:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


@pytest.fixture(scope="module")
def trained(http: httpx.Client, demo_model: Path) -> dict:
    training = upload(http, arithmetic(32, seed=12))["id"]
    job = http.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": str(demo_model),
            "training_file": training,
            "suffix": "dash",
            "hyperparameters": {"batch_size": 4},
            "training": {"max_steps": 8, "learning_rate": 3e-3},
        },
    ).json()
    done = wait_for_job(http, job["id"])
    assert done["status"] == "succeeded", done["error"]
    return done


def wait(browser, condition, timeout: float = 30):
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: condition(b))


def open_page(browser, server: str, path: str) -> None:
    """Open a page; the first time in the tab, type the key into the form it shows."""
    browser.get(server + path)
    wait(browser, lambda b: b.execute_script("return document.readyState") == "complete")
    form = browser.find_element(By.ID, "key-form")
    if form.is_displayed() or wait(browser, lambda b: _asked_or_loaded(b)) == "asked":
        browser.find_element(By.ID, "key-input").send_keys(KEY)
        form.submit()
        wait(browser, lambda b: b.execute_script("return document.readyState") == "complete")
        wait(browser, lambda b: b.execute_script("return sessionStorage.getItem('afina.apiKey')"))


def _asked_or_loaded(browser) -> str | bool:
    if browser.find_element(By.ID, "key-form").is_displayed():
        return "asked"
    return "loaded" if browser.find_elements(By.CSS_SELECTOR, "#content > *") else False


def test_the_jobs_page_lists_a_real_job(driver, server, trained):
    open_page(driver, server, "/")
    row = wait(
        driver, lambda b: b.find_elements(By.CSS_SELECTOR, f"tr[data-job='{trained['id']}']")
    )
    cells = row[0].find_elements(By.TAG_NAME, "td")
    assert cells[1].text == "succeeded"
    assert cells[2].text.strip().endswith("8 / 8")
    assert cells[6].text == "dash"
    # The key stays in the tab, in sessionStorage only: no cookie.
    assert driver.execute_script("return sessionStorage.getItem('afina.apiKey')") == KEY
    assert driver.get_cookies() == []
    screenshot(driver, "jobs")


def test_the_job_page_draws_the_jobs_loss_points(driver, server, http, trained):
    open_page(driver, server, f"/jobs/{trained['id']}")
    points = http.get(f"/v1/fine_tuning/jobs/{trained['id']}/metrics").json()["data"]
    assert len(points) == 8

    def drawn(browser):
        data = browser.execute_script("return window.afina.charts.loss.data")
        return data if data and len(data[0]) == len(points) else None

    steps, losses, _eval = wait(driver, drawn)
    assert steps == [point["step"] for point in points]
    assert losses == pytest.approx([point["loss"] for point in points])
    # uPlot drew them: its canvas is there, sized.
    canvas = driver.find_element(By.CSS_SELECTOR, "#loss-chart canvas")
    assert canvas.size["width"] > 300
    assert driver.find_element(By.ID, "job-status").text == "succeeded"
    checkpoint = driver.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")
    assert checkpoint
    assert '"max_steps": 8' in driver.find_element(By.ID, "config").text
    screenshot(driver, "job")


def test_the_chart_gains_points_while_the_job_runs_and_cancel_stops_it(
    driver, server, http, demo_model
):
    training = upload(http, arithmetic(32, seed=13))["id"]
    job = http.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": str(demo_model),
            "training_file": training,
            "training": {"max_steps": 100_000},
        },
    ).json()
    open_page(driver, server, f"/jobs/{job['id']}")

    def count(browser) -> int:
        data = browser.execute_script(
            "return window.afina.charts.loss && window.afina.charts.loss.data"
        )
        return len(data[0]) if data else 0

    first = wait(driver, lambda b: count(b) or None, 90)
    wait(driver, lambda b: count(b) > first, 60)  # no reload: the page polls
    wait(driver, lambda b: b.find_elements(By.ID, "cancel-job")).pop().click()
    wait(driver, lambda b: b.find_element(By.ID, "job-status").text == "cancelled")
    assert http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"


def test_a_bad_upload_shows_its_line_errors(driver, server, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    open_page(driver, server, "/files")
    driver.find_element(By.ID, "file-input").send_keys(str(bad))
    errors = wait(driver, lambda b: b.find_elements(By.CSS_SELECTOR, "#line-errors li"))
    texts = [item.text for item in errors]
    assert any(text.startswith("line 1:") for text in texts), texts
    assert any(text.startswith("line 2:") for text in texts), texts
    screenshot(driver, "files")


def test_a_script_bearing_file_name_is_shown_as_text(driver, server, http):
    name = "<img src=x onerror=window.pwned=1><svg onload=window.pwned=1>.jsonl"  # no / or "
    created = upload(http, arithmetic(2, seed=14), name=name)
    assert created["filename"] == name
    open_page(driver, server, "/files")
    cell = wait(
        driver,
        lambda b: b.find_elements(By.CSS_SELECTOR, f"tr[data-file='{created['id']}'] td.filename"),
    )
    assert cell[0].text == name
    # The CSP would stop an inline handler anyway: the element check below is the escaping's.
    assert driver.execute_script("return window.pwned") is None
    assert driver.find_elements(By.CSS_SELECTOR, "#files img, #files svg") == []


def test_the_new_job_page_estimates_and_creates_a_job(driver, server, http, demo_model):
    upload(http, arithmetic(8, seed=15), name="small.jsonl")
    open_page(driver, server, "/new")
    wait(driver, lambda b: b.find_elements(By.CSS_SELECTOR, "#training_file option"))
    driver.find_element(By.ID, "model").send_keys(str(demo_model))
    driver.find_element(By.ID, "n_epochs").send_keys("1")
    driver.find_element(By.ID, "estimate-job").click()
    plan = wait(driver, lambda b: b.find_element(By.ID, "estimate").text or None)
    assert "memory" in plan
    assert '"estimated_seconds":' in plan
    assert "worker(s), on queue train" in plan  # the test's worker fits it
    screenshot(driver, "new-job")
    driver.find_element(By.ID, "create-job").click()
    wait(driver, lambda b: "/jobs/ftjob-" in b.current_url)
    job_id = driver.current_url.rsplit("/", 1)[1]
    assert wait_for_job(http, job_id)["status"] == "succeeded"


def test_the_playground_streams_both_answers(driver, server, trained):
    open_page(driver, server, f"/playground?model={trained['fine_tuned_model']}")
    wait(driver, lambda b: b.find_elements(By.ID, "tuned-log"))
    driver.find_element(By.ID, "prompt").send_keys("What is 2 + 3?")
    driver.find_element(By.ID, "send").click()
    for log in ("tuned-log", "base-log"):
        answer = wait(
            driver,
            lambda b, log=log: b.find_elements(By.CSS_SELECTOR, f"#{log} .assistant.done"),
            60,
        )
        assert "bad" not in answer[0].get_attribute("class")
        assert answer[0].text  # streamed in: the demo model answers something
    user = driver.find_elements(By.CSS_SELECTOR, "#tuned-log .user")
    assert [item.text for item in user] == ["What is 2 + 3?"]
    screenshot(driver, "playground")


@pytest.fixture
def scripted_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A server whose model answers HTML: every generation streams `HOSTILE`."""

    def serve_batch(models, batch, max_new_tokens) -> None:
        for stream in batch:
            stream.post(Started(prompt_tokens=1))
            stream.post(Delta(HOSTILE))
            stream.post(Finished("stop", Usage(prompt_tokens=1, completion_tokens=1)))

    monkeypatch.setattr("afina.serving.batch.serve_batch", serve_batch)
    settings = Settings(_env_file=None, data_dir=tmp_path, api_keys=[f"default:{KEY}"])
    upgrade_database(settings.database_url)
    job = job_row(project="default", status=JobStatus.SUCCEEDED, model="org/base")
    job.fine_tuned_model = job.fine_tuned_model_name()
    app = create_app(settings)
    add_rows(settings, job)
    with app.state.storage.atomic_write(f"{adapter_key(job.id)}/adapter_config.json") as out:
        out.write(b"{}")
    with serve_in_thread(app) as url:
        yield url, job.fine_tuned_model


def test_generated_html_is_shown_as_text(driver, scripted_server):
    url, model = scripted_server
    open_page(driver, url, f"/playground?model={model}")
    wait(driver, lambda b: b.find_elements(By.ID, "tuned-log"))
    driver.find_element(By.ID, "prompt").send_keys("Say some HTML")
    driver.find_element(By.ID, "send").click()
    answer = wait(driver, lambda b: b.find_elements(By.CSS_SELECTOR, "#tuned-log .assistant.done"))
    assert answer[0].text == HOSTILE
    # The CSP would stop an inline handler anyway: the element check below is the escaping's.
    assert driver.execute_script("return window.pwned") is None
    assert driver.find_elements(By.CSS_SELECTOR, ".log img, .log script") == []


def test_pages_carry_a_strict_content_security_policy(http):
    for path in ("/", "/files", "/new", "/playground", "/jobs/ftjob-x"):
        page = httpx.get(str(http.base_url) + path)  # no key: the shell names nothing
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "'unsafe-inline'" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
    assert http.get("/v1/fine_tuning/jobs", headers={"Authorization": ""}).status_code == 401
