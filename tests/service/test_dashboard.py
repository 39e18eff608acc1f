"""The dashboard in real browsers: headless Chromium and Firefox (Debian's `chromium` and
`firefox-esr` packages), driven by Playwright's Python API (Firefox over WebDriver BiDi, Playwright's
`moz-firefox` channel: no patched browser download), against the real API with a job a real worker ran.
Every test that opens a page runs in both browsers.

It asserts what a user relies on: the training and held-out charts hold exactly the API's points
(and are drawn), the before/after table shows the report's figures as report.md formats them, the
cancel button cancels, a wrong key says so, another tenant's job is not found, and the API key is
sent only as a header, never in a URL. A missing browser or Playwright fails these tests with the
fix (`make install` installs both); they are never skipped.

`QDPO_DASHBOARD_SCREENSHOT=docs/dashboard-job.png` saves the job page it checked as a screenshot
(Chromium's; Firefox's goes to docs/dashboard-job-firefox.png).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import secrets
from pathlib import Path

import httpx
import pytest

from .conftest import TINY_JOB
from .helpers import raw

pytestmark = pytest.mark.service

CHROMIUM = os.environ.get("QDPO_TEST_CHROMIUM", "/usr/bin/chromium")
FIREFOX = os.environ.get("QDPO_TEST_FIREFOX", "/usr/bin/firefox-esr")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
VIEWPORT = {"width": 1366, "height": 900}  # a laptop screen
DASHBOARD_JOB = copy.deepcopy(TINY_JOB)
# Four optimizer steps, each one a checkpoint, none skipped by early stopping: 4 training points, 4 + 1 (init) held-out points.
DASHBOARD_JOB["method"]["hyperparameters"].update({"epochs": 2, "checkpoint_every": 1, "early_stopping_patience": 0})


BROWSERS = {
    "chromium": (CHROMIUM, "`make browser` (`apt-get install -y chromium` as root), or point QDPO_TEST_CHROMIUM at one"),
    "firefox": (FIREFOX, "`make browser` (`apt-get install -y firefox-esr` as root), or point QDPO_TEST_FIREFOX at one"),
}


@pytest.fixture(scope="module", params=sorted(BROWSERS))
def browser(request):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the dashboard tests need Playwright's Python package: run `make install` (or `.venv/bin/pip install -e '.[test]'`)", pytrace=False)
    executable, fix = BROWSERS[request.param]
    if not Path(executable).exists():
        pytest.fail(f"the dashboard tests need {request.param} at {executable}: run {fix}", pytrace=False)
    with sync_playwright() as playwright:
        if request.param == "chromium":
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        else:
            launched = playwright.firefox.launch(channel="moz-firefox", executable_path=executable, headless=True)
        yield launched
        launched.close()


def wait_for_job_view(page, job_id: str) -> None:
    """Until the job's own view has loaded. The link and goto change only the hash: until the page's
    hashchange handler runs, `ready` still says the previous view (the jobs list) loaded."""
    page.wait_for_function(
        "(id) => window.qdpoDashboard && window.qdpoDashboard.ready && document.querySelector('#job-id')?.textContent === id",
        arg=job_id,
    )


class Session:
    """One browser context (its own sessionStorage) on the dashboard, recording every request it makes."""

    def __init__(self, browser, base_url: str, *, bypass_csp: bool = True):
        # The waits are arrow functions: Firefox polls a bare expression string with eval(), which the page's CSP forbids
        # (and Playwright cannot bypass the CSP over WebDriver BiDi). One test runs without the bypass in both browsers.
        self.context = browser.new_context(viewport=VIEWPORT, bypass_csp=bypass_csp, accept_downloads=True)
        self.page = self.context.new_page()
        self.base_url = base_url
        self.requests: list = []
        self.console: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    def sign_in(self, key: str) -> None:
        self.page.goto(self.base_url + "/")
        self.page.fill("#api-key", key)
        self.page.click("#login-form button[type=submit]")

    def open_job(self, job_id: str) -> None:
        self.page.goto(f"{self.base_url}/dashboard/#/jobs/{job_id}")
        wait_for_job_view(self.page, job_id)

    def chart(self, name: str) -> list[list]:
        return self.page.evaluate(f"window.qdpoDashboard.charts[{name!r}].data.map((d) => Array.from(d))")

    def chart_labels(self, name: str) -> list[str]:
        return self.page.evaluate(f"window.qdpoDashboard.charts[{name!r}].series.map((s) => s.label)")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session(browser, request):
    sessions = []

    def open_session(base_url: str, **options) -> Session:
        sessions.append(Session(browser, base_url, **options))
        return sessions[-1]

    yield open_session
    for opened in sessions:
        opened.close()


@pytest.fixture(scope="module")
def finished(worker_deployment):
    """A tenant with one job the worker ran to the end, and everything the API says about it."""
    key = worker_deployment.new_key(f"dash-{secrets.token_hex(3)}")
    with worker_deployment.client(key) as client:
        job = client.jobs.create(**copy.deepcopy(DASHBOARD_JOB), suffix="dash")
        job = client.jobs.wait(job.id, poll_interval=0.3, timeout=600, progress=False)
        return {
            "key": key,
            "job": job,
            "metrics": client.jobs.metrics(job.id),
            "checkpoints": client.jobs.checkpoints(job.id),
            "report": client.jobs.report(job.id),
            "events": client.jobs.events(job.id, limit=1000).data,
        }


def _python_format(value, pattern: str) -> str:
    from qdpo_core.report import _fmt

    return _fmt(value, pattern)


def test_the_job_page_draws_the_run_and_shows_the_report(worker_deployment, finished, session):
    from qdpo_core.report import ROWS

    job, report, metrics, checkpoints, key = finished["job"], finished["report"], finished["metrics"], finished["checkpoints"], finished["key"]
    assert len(metrics) == 4 and len(checkpoints) == 4  # what DASHBOARD_JOB makes
    browser = session(worker_deployment.base_url)
    browser.sign_in(key)
    page = browser.page
    # the jobs page: this tenant's job, its figures
    row = page.wait_for_selector(f"#jobs-table tr[data-job='{job.id}']")
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    assert cells[1] == "succeeded" and cells[2] == "tiny" and cells[3] == "RTN 2-bit, group 32" and cells[4] == "qdpo"
    closed = report["gap_closed"]
    assert cells[7] == f"{_python_format(closed['token_flip_rate'], '{:.0%}')} / {_python_format(closed['kl'], '{:.0%}')}"
    page.click(f"a[href='#/jobs/{job.id}']")
    wait_for_job_view(page, job.id)
    page.wait_for_selector("#report-table")

    # training curves: one point per optimizer step, the API's values
    steps = [m.step for m in metrics]
    loss = browser.chart("loss")
    assert loss[0] == steps and loss[1] == pytest.approx([m.values["loss"] for m in metrics])
    rewards = browser.chart("rewards")
    assert browser.chart_labels("rewards")[1:] == ["chosen", "rejected"]
    assert rewards[1] == pytest.approx([m.values["chosen_reward"] for m in metrics]) and rewards[2] == pytest.approx(
        [m.values["rejected_reward"] for m in metrics]
    )
    assert browser.chart("margin")[1] == pytest.approx([m.values["reward_margin"] for m in metrics])
    assert browser.chart("accuracy")[1] == pytest.approx([m.values["reward_accuracy"] for m in metrics])
    assert browser.chart("learning_rate")[1] == pytest.approx([m.values["learning_rate"] for m in metrics])

    # held-out metrics: the init as step 0, then every checkpoint; PTQ-only and FP as levels; the exported one marked
    selected = report["selected_checkpoint"]
    for name, key_ in (("flip", "token_flip_rate"), ("kl", "kl")):
        xs, points, ptq, fp, marked = browser.chart(name)
        assert xs == [0] + [c.step for c in checkpoints]
        assert points == pytest.approx([report["init"]["metrics"][key_]] + [c.metrics[key_] for c in checkpoints])
        assert ptq == pytest.approx([report["ptq"][key_]] * len(xs)) and fp == pytest.approx([report["fp"][key_]] * len(xs))
        assert [x for x, v in zip(xs, marked) if v is not None] == [selected]
        assert browser.chart_labels(name)[1:] == ["checkpoints (step 0: calibrated init)", "PTQ-only", "FP", f"selected (step {selected})"]

    # and they are drawn: every chart's canvas has ink on it
    inked = page.evaluate(
        """Object.fromEntries(Object.entries(window.qdpoDashboard.charts).map(([name, u]) => {
             const c = u.ctx.canvas, px = u.ctx.getImageData(0, 0, c.width, c.height).data;
             let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++;
             return [name, n];
           }))"""
    )
    assert set(inked) == {"loss", "rewards", "margin", "accuracy", "learning_rate", "flip", "kl"} and min(inked.values()) > 500, inked

    # the before/after table holds the report's figures, formatted as report.md formats them
    init = report["init"] if report["init"].get("kept") else None
    headers = [th.inner_text() for th in page.query_selector_all("#report-table thead th")]
    assert headers == ["metric", "FP", "PTQ-only", *([f"{init['init']} init"] if init else []), "aligned", "gap closed"]
    shown = 0
    for key_, _label, pattern in ROWS:
        row = page.query_selector(f"#report-table tr[data-metric='{key_}']")
        if key_ not in report["aligned"] and key_ not in report["ptq"]:
            assert row is None
            continue
        values = [report["fp"].get(key_), report["ptq"].get(key_), *([init["metrics"].get(key_)] if init else []), report["aligned"].get(key_)]
        expected = [_python_format(v, pattern) for v in values] + [_python_format(report["gap_closed"].get(key_), "{:.0%}")]
        assert [td.inner_text() for td in row.query_selector_all("td")] == expected, key_
        shown += 1
    assert shown >= 5
    assert page.inner_text("#verdict") == report["verdict"]

    # samples side by side, the stage timeline, the events
    answers = page.evaluate(
        "Array.from(document.querySelectorAll('#samples article')).map((a) => Array.from(a.querySelectorAll('blockquote')).map((b) => b.textContent))"
    )
    assert answers == [[s["fp"], s["ptq"], s["aligned"]] for s in report["samples"]]
    assert page.evaluate("Array.from(document.querySelectorAll('#timeline li')).map((li) => [li.dataset.stage, li.className])") == [
        [stage, "stage-done"] for stage in ("prepare", "quantize", "baseline", "init", "pairs", "train", "evaluate", "export")
    ]
    page.wait_for_function(f"() => document.querySelectorAll('#events li').length === {len(finished['events'])}")
    assert page.inner_text("#events li:last-child").endswith(finished["events"][-1].message)
    assert page.query_selector("#cancel-job").is_hidden()  # nothing to cancel

    # the adapter downloads, byte for byte
    if page.context.browser.browser_type.name == "chromium":
        with page.expect_download() as download:
            page.click("#downloads button")
        saved_name, saved_sha256 = download.value.suggested_filename, hashlib.sha256(Path(download.value.path()).read_bytes()).hexdigest()
    else:
        saved_name, saved_sha256 = _blob_download(page, "#downloads button")
    assert saved_sha256 == job.adapter.sha256
    assert saved_name == f"{job.id}-adapter.tar.gz"

    # the key went as a header and never into a URL
    api_calls = [r for r in browser.requests if "/v1/" in r.url]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {key}" for r in api_calls)
    assert not [r.url for r in browser.requests if key in r.url or key[8:20] in r.url]
    if target := os.environ.get("QDPO_DASHBOARD_SCREENSHOT"):
        engine = page.context.browser.browser_type.name
        if engine != "chromium":  # docs/dashboard-job.png is Chromium's; the others sit beside it
            target = str(Path(target).with_stem(f"{Path(target).stem}-{engine}"))
        page.click("#job-id")  # no focus ring or hover in the picture
        page.screenshot(path=target, full_page=True)


def _blob_download(page, selector: str) -> tuple[str, str]:
    """The file name and sha256 of what the page hands the browser to save, read in the page itself.

    Firefox over WebDriver BiDi reports downloads of a URL but not of a blob: URL (which is how the
    page saves what it fetched with the key as a header), so there the test catches the blob and the
    name at the link the page clicks.
    """
    page.evaluate(
        """() => {
             window.__saved = [];
             const blobs = new Map(), create = URL.createObjectURL, click = HTMLAnchorElement.prototype.click;
             URL.createObjectURL = (blob) => { const url = create.call(URL, blob); blobs.set(url, blob); return url; };
             HTMLAnchorElement.prototype.click = function () {
               if (blobs.has(this.href)) window.__saved.push({ name: this.download, blob: blobs.get(this.href) });
               return click.call(this);
             };
           }"""
    )
    page.click(selector)
    page.wait_for_function("() => window.__saved.length === 1")
    return tuple(
        page.evaluate(
            """async () => {
                 const { name, blob } = window.__saved[0];
                 const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
                 return [name, Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("")];
               }"""
        )
    )


def test_numbers_are_formatted_as_report_md_formats_them(api_deployment, session):
    """Python rounds the exact binary value half to even ("{:.1%}" of 0.90625 is 90.6%); JavaScript's toFixed does not."""
    browser = session(api_deployment.base_url)
    browser.page.goto(api_deployment.base_url + "/dashboard/")
    browser.page.wait_for_function("() => window.qdpoDashboard && window.qdpoDashboard.formatValue")
    values = [
        0.0,
        -0.0,
        1.0,
        0.90625,
        0.90675,
        0.125,
        0.375,
        0.0625,
        0.004,
        -0.004,
        -0.25,
        0.9999,
        2.5,
        3.5,
        1234.56785,
        32561.575746600396,
        1e-9,
        -1.5,
        0.045,
        None,
    ]
    patterns = ["{:.1%}", "{:.0%}", "{:.4f}", "{:.3f}"]
    cases = [(v, p) for v in values for p in patterns]
    shown = browser.page.evaluate("(cases) => cases.map(([v, p]) => window.qdpoDashboard.formatValue(v, p))", cases)
    assert shown == [_python_format(v, p) for v, p in cases]


def test_the_cancel_button_cancels_and_the_jobs_page_follows(api_deployment, session):
    """On the API-only deployment (no worker) a job stays queued until it is cancelled from the page."""
    key = api_deployment.new_key(f"dash-{secrets.token_hex(3)}")
    browser = session(api_deployment.base_url)
    browser.sign_in(key)
    page = browser.page
    page.wait_for_selector("#jobs-table td.muted")  # no jobs yet
    with raw(api_deployment, key) as http:
        job_id = http.post("/v1/jobs", json={"suffix": "to-cancel"}).json()["id"]
        row = page.wait_for_selector(f"#jobs-table tr[data-job='{job_id}']", timeout=10_000)  # the page updates itself
        assert "queued" in row.inner_text()
        page.click(f"a[href='#/jobs/{job_id}']")
        wait_for_job_view(page, job_id)
        assert page.inner_text("#job-status") == "queued"
        dialogs = []
        page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
        page.click("#cancel-job")
        page.wait_for_function("() => document.querySelector('#job-status').textContent === 'cancelled'")
        assert dialogs and job_id in dialogs[0]
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        page.wait_for_selector("#events li:has-text('cancelled before it started')")  # the live event stream
        assert page.query_selector("#cancel-job").is_hidden()
        # the status filter
        page.goto(f"{api_deployment.base_url}/dashboard/#/jobs?status=queued")
        page.wait_for_selector("#jobs-table td.muted")
        assert page.query_selector(f"tr[data-job='{job_id}']") is None
        page.select_option("#status-filter", "cancelled")
        page.wait_for_selector(f"#jobs-table tr[data-job='{job_id}']")


def test_a_wrong_key_shows_why_and_keeps_nothing(api_deployment, session):
    browser = session(api_deployment.base_url)
    browser.sign_in("qdpo_sk_not-a-real-key")
    page = browser.page
    error = page.wait_for_selector("#login-error:not([hidden])")
    assert error.inner_text().startswith("This API key was not accepted (invalid_api_key): the API key is unknown or revoked")
    assert "qdpo keys create --tenant NAME" in error.inner_text()
    assert page.query_selector("#view").is_hidden() and page.query_selector("#jobs-table") is None
    assert page.evaluate("sessionStorage.length") == 0
    # a key that is revoked while the page is open sends the user back to sign in, saying why
    from service.crud import keys as keys_crud

    with api_deployment.sessions() as db:
        record, key = keys_crud.create_key(db, tenant_name=f"revoked-{secrets.token_hex(3)}")
    browser.sign_in(key)
    page.wait_for_selector("#jobs-table")
    with api_deployment.sessions() as db:
        keys_crud.revoke_key(db, key_id=record.id)
    error = page.wait_for_selector("#login-error:not([hidden])", timeout=15_000)  # at the next refresh
    assert "not accepted" in error.inner_text() and page.evaluate("sessionStorage.length") == 0


def test_another_tenants_job_is_not_found(worker_deployment, finished, session):
    stranger = worker_deployment.new_key(f"dash-other-{secrets.token_hex(3)}")
    browser = session(worker_deployment.base_url)
    browser.sign_in(stranger)
    page = browser.page
    page.wait_for_selector("#jobs-table td.muted")  # their own (empty) list
    assert page.query_selector(f"tr[data-job='{finished['job'].id}']") is None
    page.goto(f"{worker_deployment.base_url}/dashboard/#/jobs/{finished['job'].id}")
    message = page.wait_for_selector("#not-found")
    assert message.inner_text() == f"job_not_found: no job with id {finished['job'].id!r}"


def test_the_page_works_under_its_content_security_policy(worker_deployment, finished, session):
    """No inline script or style, nothing from another origin: the page runs with its CSP enforced and logs no error."""
    browser = session(worker_deployment.base_url, bypass_csp=False)
    browser.sign_in(finished["key"])
    page = browser.page
    page.wait_for_selector("#jobs-table tr[data-job]")
    page.goto(f"{worker_deployment.base_url}/dashboard/#/jobs/{finished['job'].id}")
    page.wait_for_selector("#report-table")
    page.wait_for_selector("figure.chart[data-chart='kl'] canvas")
    assert browser.console == [], browser.console
    assert {urlparse_origin(r.url) for r in browser.requests} == {worker_deployment.base_url}


def urlparse_origin(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def test_the_dashboard_is_served_by_the_api_without_anything_from_outside(api_deployment):
    base = api_deployment.base_url
    root = httpx.get(base + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "dashboard/"
    page = httpx.get(base + "/dashboard/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"] and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    referenced = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert referenced and all(not re.match(r"[a-z]+://|//", ref) for ref in referenced if not ref.startswith("data:")), referenced
    for ref in referenced:
        if ref.startswith("data:"):
            continue
        asset = httpx.get(f"{base}/dashboard/{ref}")
        assert asset.status_code == 200, ref
        assert not re.search(rb"https?://(?!github\.com/leeoniya|www\.w3\.org)", asset.content), ref  # no CDN, no remote fetch
    licence = httpx.get(f"{base}/dashboard/static/vendor/uplot/LICENSE")
    assert licence.status_code == 200 and "MIT License" in licence.text and "Leon Sorokin" in licence.text
    for probe in ("/dashboard/static/../../service/config.py", "/dashboard/static/dashboard/nope.js", "/dashboard/static/%2e%2e/api/main.py"):
        assert httpx.get(base + probe).status_code == 404, probe
