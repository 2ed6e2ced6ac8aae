"""``seesr ui`` in a real browser: headless Chromium (Debian's) driven by Selenium through Debian's chromedriver,
against ``seesr ui`` started on the tiny bundle on 127.0.0.1.

One server serves the whole module (concurrency 1); two browsers share it. Each run is small (a 24x20 input,
process size 64, 1-2 steps) except the one that is cancelled. Set SEESR_UI_SCREENSHOT=PATH to save the page
with a result (docs/images/ui.png is made so).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seesr_runtime.cli import main as seesr
from seesr_runtime.errors import ImageRejected
from seesr_runtime.inputs import load_lr_image
from seesr_runtime.lazy import available

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not available("gradio"):
    pytest.skip("gradio is not installed (the 'ui' extra: pip install '.[ui]')", allow_module_level=True)
if not available("selenium"):
    pytest.skip("selenium is not installed (the 'dev' extra)", allow_module_level=True)
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# A server and two browsers end to end (about a minute): `make test` and CI run them, `make test-fast` leaves them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"process_size": 64}  # set in the page and on the command line alike: a 64 px working size
WAIT_S = 120  # for a job on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutboundRecorder:
    """A TCP listener the server's HTTP(S)_PROXY points at: any request the server makes to another host
    (analytics, version check, telemetry) arrives here instead of the network."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    self.seen.append(connection.recv(200))
                except OSError:
                    self.seen.append(b"(connected)")


@pytest.fixture(scope="module")
def server(runtime_bundle, tmp_path_factory):
    """``seesr ui`` in a subprocess; its TMPDIR a folder of its own, its proxies an ``OutboundRecorder``."""
    port, tmp = _free_port(), tmp_path_factory.mktemp("ui-server-tmp")
    recorder = OutboundRecorder()
    proxy = f"http://127.0.0.1:{recorder.port}"
    env = {**os.environ, "TMPDIR": str(tmp), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    env.update({key: proxy for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "runtime"), str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "seesr_runtime.cli", "ui", "--bundle", str(runtime_bundle), "--port", str(port)]
    command += ["--backend", "onnxruntime", "--no-verify", "--max-file-size", "1MB"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + WAIT_S
    while not any("serving on" in line for line in lines):
        assert process.poll() is None and time.monotonic() < deadline, "seesr ui did not start:\n" + "".join(lines)
        time.sleep(0.2)
    yield {"url": f"http://127.0.0.1:{port}", "process": process, "lines": lines, "tmp": tmp, "recorder": recorder}
    if process.poll() is None:
        process.kill()
        process.wait()


def _browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def browsers(server):
    """Two browser sessions on the page (two Chromium processes, so two Gradio sessions)."""
    drivers = [_browser(), _browser()]
    for driver in drivers:
        driver.get(server["url"])
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#seesr-option-steps input"))
    yield drivers
    for driver in drivers:
        driver.quit()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-photos")
    rng = np.random.default_rng(3)
    paths = {}
    for name in ("first", "second"):
        paths[name] = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(paths[name])
    truncated = folder / "truncated.png"
    truncated.write_bytes(paths["first"].read_bytes()[: paths["first"].stat().st_size // 2])
    paths["truncated"] = truncated
    return paths


def cli_png(bundle, photo: Path, out: Path, steps: int, seed: int) -> bytes:
    """What ``seesr upscale`` writes for ``photo`` with these options."""
    options = ["--steps", str(steps), "--seed", str(seed), "--process-size", str(SMALL["process_size"])]
    code = seesr(
        ["upscale", str(photo), "-o", str(out), "--bundle", str(bundle), "--backend", "onnxruntime", "-q", *options]
    )
    assert code == 0
    return (out / f"{photo.stem}.png").read_bytes()


# ---------------------------------------------------------------- page helpers


def status(driver) -> str:
    """The job's status line (the markdown under the progress overlay)."""
    return driver.find_element(By.CSS_SELECTOR, "#seesr-status .prose").text.strip()


def upload(driver, photo: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, "#seesr-input input[type=file]").send_keys(str(photo))
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#seesr-input img"))


def set_value(driver, option: str, value) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#seesr-option-{option.replace('_', '-')} input[type=number]")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def open_advanced(driver) -> None:
    for button in driver.find_elements(By.CSS_SELECTOR, "button.label-wrap"):
        if "Advanced" in button.text and "open" not in (button.get_attribute("class") or ""):
            button.click()


def start(driver, steps: int, seed: int) -> None:
    open_advanced(driver)
    set_value(driver, "process_size", SMALL["process_size"])
    set_value(driver, "steps", steps)
    set_value(driver, "seed", seed)
    before = status(driver)
    driver.find_element(By.ID, "seesr-run").click()
    WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: status(d) != before)  # the job is armed


def finished(driver, timeout: float = WAIT_S) -> str:
    try:
        WebDriverWait(driver, timeout).until(lambda d: status(d).startswith(("done:", "error:", "cancelled:")))
    except TimeoutException:
        text = driver.find_element(By.ID, "seesr-status").text
        raise AssertionError(f"no result after {timeout} s: {text!r}") from None
    return status(driver)


def downloads(driver, server) -> list[bytes]:
    links = driver.find_elements(By.CSS_SELECTOR, "#seesr-files a[href]")
    return [urllib.request.urlopen(link.get_attribute("href"), timeout=30).read() for link in links]


def textbox(driver, element_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{element_id} textarea").get_attribute("value")


# ---------------------------------------------------------------- tests


def test_page_shows_the_options_table_with_the_bundles_defaults(server, browsers, runtime_pipeline):
    driver = browsers[0]
    open_advanced(driver)
    for name in ("steps", "process_size", "latent_tile_size"):
        field = driver.find_element(By.CSS_SELECTOR, f"#seesr-option-{name.replace('_', '-')} input[type=number]")
        assert int(field.get_attribute("value")) == runtime_pipeline.defaults[name]
    steps = driver.find_element(By.CSS_SELECTOR, "#seesr-option-steps input[type=number]")
    assert (steps.get_attribute("min"), steps.get_attribute("max")) == ("1", "999")  # the table's range
    assert "DDPM steps" in driver.find_element(By.ID, "seesr-option-steps").text  # the table's help


def test_upscale_download_matches_seesr_upscale(server, browsers, photos, runtime_bundle, runtime_pipeline, tmp_path):
    driver = browsers[0]
    upload(driver, photos["first"])
    start(driver, steps=2, seed=5)
    text = finished(driver)
    assert text.startswith("done: 1 sample of 24x20 -> 96x80, 2 steps, seed 5, in "), text
    (png,) = downloads(driver, server)
    assert png == cli_png(runtime_bundle, photos["first"], tmp_path, steps=2, seed=5)
    library = runtime_pipeline(Image.open(photos["first"]), steps=2, seed=5, **SMALL)
    assert textbox(driver, "seesr-tags") == library.tags
    assert textbox(driver, "seesr-prompt") == library.prompt
    assert len(driver.find_elements(By.CSS_SELECTOR, "#seesr-comparison img")) == 2  # before and after
    if os.environ.get("SEESR_UI_SCREENSHOT"):
        driver.save_screenshot(os.environ["SEESR_UI_SCREENSHOT"])


def test_truncated_file_shows_the_library_message_then_a_good_one_works(server, browsers, photos):
    driver = browsers[0]
    with pytest.raises(ImageRejected) as refused:
        load_lr_image(photos["truncated"])
    driver.find_element(By.CSS_SELECTOR, "#seesr-input button[aria-label='Remove Image']").click()
    driver.find_element(By.CSS_SELECTOR, "#seesr-input input[type=file]").send_keys(str(photos["truncated"]))
    time.sleep(1)  # the upload of a file the browser cannot preview
    start(driver, steps=1, seed=0)
    assert finished(driver) == f"error: {refused.value}"
    upload_after_remove(driver, photos["second"])
    start(driver, steps=1, seed=0)
    assert finished(driver).startswith("done: 1 sample of 24x20")


def upload_after_remove(driver, photo: Path) -> None:
    for button in driver.find_elements(By.CSS_SELECTOR, "#seesr-input button[aria-label='Remove Image']"):
        button.click()
    upload(driver, photo)


def test_two_sessions_each_get_their_own_image(server, browsers, photos, runtime_bundle, tmp_path):
    for driver, photo in zip(browsers, (photos["first"], photos["second"])):
        upload_after_remove(driver, photo)
    for driver, seed in zip(browsers, (11, 12)):
        start(driver, steps=1, seed=seed)
    texts = [finished(driver) for driver in browsers]
    assert all(text.startswith("done:") for text in texts), texts
    got = [downloads(driver, server)[0] for driver in browsers]
    expected = [
        cli_png(runtime_bundle, photos["first"], tmp_path / "a", steps=1, seed=11),
        cli_png(runtime_bundle, photos["second"], tmp_path / "b", steps=1, seed=12),
    ]
    assert got == expected and got[0] != got[1]


def test_cancel_stops_a_long_run_while_the_other_session_waits_its_turn(server, browsers, photos):
    running, waiting = browsers
    for driver, photo in zip(browsers, (photos["first"], photos["second"])):
        upload_after_remove(driver, photo)
    start(running, steps=500, seed=0)  # long enough to cancel mid-run
    WebDriverWait(running, WAIT_S).until(lambda d: "denoising" in d.find_element(By.ID, "seesr-status").text)
    start(waiting, steps=1, seed=1)
    # the waiting session is shown its place in the queue while the long job runs
    WebDriverWait(waiting, 30).until(lambda d: "queue" in d.find_element(By.ID, "seesr-status").text.lower())
    running.find_element(By.ID, "seesr-cancel").click()
    WebDriverWait(running, 30).until(lambda d: status(d).startswith(("cancelling", "cancelled")))  # acknowledged
    assert finished(running).startswith("cancelled: cancelled after step ")
    assert finished(waiting).startswith("done:")
    start(running, steps=1, seed=2)  # the page is ready for the next job
    assert finished(running).startswith("done:")


def test_hand_made_request_out_of_range_gets_the_library_message(server, browsers, photos):
    import httpx

    url = server["url"]
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        uploaded = client.post("/gradio_api/upload", files={"files": photos["first"].open("rb")}).json()[0]
        info = client.get("/gradio_api/info").json()["named_endpoints"]["/upscale"]["parameters"]
        values = [p["parameter_default"] for p in info]
        values[0] = {"path": uploaded, "meta": {"_type": "gradio.FileData"}, "orig_name": "first.png"}
        labels = [p["label"] for p in info]
        values[labels.index("steps")] = 5000
        event = client.post("/gradio_api/call/upscale", json={"data": values}).json()["event_id"]
        stream = client.get(f"/gradio_api/call/upscale/{event}").text
    data = json.loads(stream.split("event: complete\ndata: ", 1)[1].splitlines()[0])
    assert "error: steps must be in [1, 999], got 5000" in data
    # and the server goes on serving the page
    driver = browsers[0]
    start(driver, steps=1, seed=3)
    assert finished(driver).startswith("done:")


def test_hand_made_request_cannot_make_the_server_fetch_a_url(server):
    """Gradio fetches an http(s) URL given as an input file's path; the server refuses such a request first."""
    import httpx

    recorder = server["recorder"]
    with httpx.Client(base_url=server["url"], timeout=60, trust_env=False) as client:
        info = client.get("/gradio_api/info").json()["named_endpoints"]["/upscale"]["parameters"]
        values = [p["parameter_default"] for p in info]
        values[0] = {"path": f"http://127.0.0.1:{recorder.port}/photo.png", "meta": {"_type": "gradio.FileData"}}
        response = client.post("/gradio_api/call/upscale", json={"data": values})
        if response.status_code == 200:  # refused later, in the event stream
            client.get(f"/gradio_api/call/upscale/{response.json()['event_id']}")
    assert response.status_code == 400 and "URL" in response.text
    assert recorder.seen == []


def test_no_request_leaves_the_machine(server, browsers):
    """Every request the pages made went to the server, and the server made none (its proxies record)."""
    hosts = set()
    for driver in browsers:
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                url = message["params"]["request"]["url"]
                if not url.startswith(("data:", "blob:")):
                    hosts.add(url.split("/")[2])
    assert hosts == {server["url"].split("/")[2]}
    assert server["recorder"].seen == [], server["recorder"].seen


def test_stopping_removes_the_temporary_files(server, browsers):
    process = server["process"]
    before = [p for p in server["tmp"].iterdir() if p.name.startswith("seesr-ui-")]
    assert len(before) == 1 and any(before[0].rglob("*.png"))  # the results were there
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not [p for p in server["tmp"].iterdir() if p.name.startswith(("seesr-ui-", "gradio"))]
    assert any("temporary files removed" in line for line in server["lines"])
    shutil.rmtree(server["tmp"], ignore_errors=True)
