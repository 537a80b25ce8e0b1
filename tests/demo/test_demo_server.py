"""The web demo for real: ``python -m dar_jax.demo`` in a subprocess with the shipped model,
driven by gradio_client and by a real headless Chromium (Debian's chromium + chromium-driver
through selenium). Every image is compared, pixel for pixel, with pipeline.sample.

Without gradio or the browser these tests skip, naming what is missing; under CI=true they fail.
Set DAR_DEMO_SCREENSHOT=docs/demo.png to refresh the README's screenshot.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from dar_jax import pipeline
from dar_jax.data import synthetic
from dar_jax.io import grid as make_grid

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # gradio_client imports huggingface_hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DEFAULT = REPO / "models" / "default"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
APT = "apt-get install -y chromium chromium-driver"
GROUPS = 4  # the shipped model's token groups (checked against /health)


def _missing(what: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI=true: the demo tests must run)")
    pytest.skip(what)


def _need_gradio():
    if importlib.util.find_spec("gradio") is None or importlib.util.find_spec("gradio_client") is None:
        _missing("gradio is not installed: pip install -e '.[test,demo]'")


# a sitecustomize for the server process: records and refuses every connection that is not local
NETWORK_GUARD = textwrap.dedent('''
    import os, socket
    _log = os.environ["DAR_NETWORK_GUARD_LOG"]
    _gai, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def _local(host):
        host = host.decode() if isinstance(host, bytes) else str(host)
        return host in ("", "localhost", "0.0.0.0", "::1", "::") or host.startswith("127.")

    def _refuse(what):
        with open(_log, "a") as f:
            f.write(f"{what}\\n")
        raise OSError(f"network access refused by the test: {what}")

    def getaddrinfo(host, *a, **k):
        if host is not None and not _local(host):
            _refuse(f"getaddrinfo {host}")
        return _gai(host, *a, **k)

    def _check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(f"connect {address}")

    def connect(self, address):
        _check(self, address)
        return _connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return _connect_ex(self, address)

    socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
''')


class Server:
    def __init__(self, url, proc, log, guard_log):
        self.url, self.proc, self.log, self.guard_log = url, proc, log, guard_log

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read()

    def health(self):
        status, body = self.get("/health")
        assert status == 200
        return json.loads(body)

    def tail(self):
        return self.log.read_text()[-4000:] if self.log.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _need_gradio()
    root = tmp_path_factory.mktemp("demo_server")
    (root / "guard").mkdir()
    (root / "guard" / "sitecustomize.py").write_text(NETWORK_GUARD)
    guard_log, log = root / "network.log", root / "server.log"
    guard_log.write_text("")
    port = _free_port()
    env = {**os.environ, "DAR_NETWORK_GUARD_LOG": str(guard_log),
           "PYTHONPATH": os.pathsep.join([str(root / "guard"), str(REPO)]),
           "GRADIO_TEMP_DIR": str(root / "gradio")}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the demo turns analytics off by itself
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dar_jax.demo", "--port", str(port), "--max-images", "4"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, guard_log)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the demo server exited ({proc.returncode}):\n{srv.tail()}")
        try:
            srv.health()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the demo server did not answer /health:\n{srv.tail()}")
            time.sleep(0.5)
    yield srv
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def models():
    return pipeline.load_models(str(DEFAULT / "gpt"), str(DEFAULT / "tokenizer"))


_expected_cache = {}


def expected(models, label=0, seed=0, options=pipeline.SampleOptions(), layout=None, k=0):
    """(preview grid after each group, final grid), uint8, straight from pipeline.sample."""
    key = (label, seed, options, None if layout is None else layout.tobytes(), k)
    if key not in _expected_cache:
        prefix, prefix_len = None, 0
        if layout is not None:
            prefix, prefix_len = pipeline.layout_prefix(models, layout, k)
        res = pipeline.sample(models, [label], pipeline.sample_keys(seed, 1), options, prefix=prefix,
                              prefix_len=prefix_len, previews=True)
        previews = pipeline.to_uint8(np.asarray(res.previews))
        _expected_cache[key] = ([make_grid(previews[:, g]) for g in range(previews.shape[1])],
                                make_grid(pipeline.to_uint8(np.asarray(res.images))))
    return _expected_cache[key]


def read_png(path_or_bytes) -> np.ndarray:
    import io
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def layout_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("layout") / "layout.png"
    Image.fromarray(synthetic.render(2, 40, np.random.default_rng(3))).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# HTTP and the gradio_client API
# ----------------------------------------------------------------------------------------------
def test_health(server):
    info = server.health()
    assert info["status"] == "ok" and info["classes"] == 10 and info["groups"] == GROUPS
    assert info["model"]["gpt"].endswith("models/default/gpt") and info["model"]["resolution"] == 32
    status, page = server.get("/")
    assert status == 200 and b"<html" in page


def test_api_streams_one_update_per_group_then_the_final_image(server, models, layout_png):
    from gradio_client import Client, handle_file
    client = Client(server.url + "/", verbose=False)
    outputs = list(client.submit(api_name="/generate"))  # every input has a default
    previews, final = expected(models)
    assert [g for _, g in outputs] == list(range(1, GROUPS + 1))
    for (path, _), want in zip(outputs, previews):
        np.testing.assert_array_equal(read_png(path), want)
    np.testing.assert_array_equal(read_png(outputs[-1][0]), final)

    # the layout image and K through the same endpoint; moving traced values compiles nothing
    compiled = server.health()["compilations"]
    options = pipeline.SampleOptions(cfg_scale="1.5,6", temperature=0.9)
    outputs = list(client.submit(class_id=5, seed=7, cfg_scale="1.5,6", temperature=0.9,
                                 layout_image=handle_file(str(layout_png)), layout_groups=2,
                                 api_name="/generate"))
    assert [g for _, g in outputs] == list(range(1, GROUPS + 1))
    previews, final = expected(models, 5, 7, options, pipeline.load_image(str(layout_png), 32), 2)
    for (path, _), want in zip(outputs, previews):
        np.testing.assert_array_equal(read_png(path), want)
    np.testing.assert_array_equal(read_png(outputs[-1][0]), final)
    outputs = list(client.submit(class_id=8, seed=1, cfg_scale=2.5, api_name="/generate"))
    np.testing.assert_array_equal(read_png(outputs[-1][0]),
                                  expected(models, 8, 1, pipeline.SampleOptions(cfg_scale=2.5))[1])
    assert server.health()["compilations"] == compiled

    # bad input: a clear error, and the server keeps serving
    for kwargs, message in ((dict(class_id=10**6), "class must be an integer in [0, 9]"),
                            (dict(cfg_scale="four"), "CFG scale: malformed"),
                            (dict(steps=-3), "decoder steps must be")):
        with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
            client.predict(api_name="/generate", **kwargs)
    assert server.health()["status"] == "ok"


def test_queue_shows_positions_and_two_clients_both_finish(server, models):
    from gradio_client import Client
    from gradio_client.utils import Status, StatusUpdate

    async def run(seed):
        job = Client(server.url + "/", verbose=False).submit(seed=seed, api_name="/generate")
        statuses, outputs = [], []
        async for update in job:
            (statuses if isinstance(update, StatusUpdate) else outputs).append(update)
        return statuses, job.outputs()

    async def both():
        return await asyncio.gather(run(1), run(2))

    for seed, (statuses, outputs) in zip((1, 2), asyncio.run(both())):
        queued = [s for s in statuses if s.code == Status.IN_QUEUE]
        assert queued and all(s.rank is not None and s.queue_size >= 1 for s in queued), statuses
        assert [g for _, g in outputs] == list(range(1, GROUPS + 1))
        np.testing.assert_array_equal(read_png(outputs[-1][0]), expected(models, seed=seed)[1])


# ----------------------------------------------------------------------------------------------
# the page in a real browser
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        _missing(f"no Chromium at {CHROMIUM} / {CHROMEDRIVER}: {APT}")
    if importlib.util.find_spec("selenium") is None:
        _missing("selenium is not installed: pip install -e '.[test,demo]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--no-first-run", "--disable-background-networking", "--disable-extensions",
                # nothing outside this machine resolves: a page that needed the internet would break
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    downloads = tmp_path_factory.mktemp("downloads")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=180):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def _css(driver, selector):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, selector)


def _all(driver, selector):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, selector)


def _open(driver, server):
    driver.get(server.url + "/")
    _wait(driver, lambda: _all(driver, "#generate") and _all(driver, "#group_counter"))


def _pick_class(driver, label: str):
    from selenium.webdriver.common.keys import Keys
    box = _css(driver, "#class input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(label.split(": ", 1)[1])
    option = f'li[role=option][aria-label="{label}"]'
    _wait(driver, lambda: _all(driver, option))
    _css(driver, option).click()
    _wait(driver, lambda: _css(driver, "#class input").get_attribute("value") == label)


def _type(driver, selector, text):
    from selenium.webdriver.common.keys import Keys
    box = _css(driver, selector)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text, Keys.TAB)


def _counter(driver) -> str:
    return _css(driver, "#group_counter").text.strip()


def _src(driver, selector):
    imgs = _all(driver, f"{selector} img")
    return imgs[0].get_attribute("src") if imgs else None


def _record(driver):
    """Starts recording every value the group counter and the preview take."""
    driver.execute_script("""
        window.__seen = {counter: [], preview: []};
        const note = (list, value) => { if (value && list[list.length - 1] !== value) list.push(value); };
        const look = () => {
            note(window.__seen.counter, document.querySelector('#group_counter').innerText.trim());
            const img = document.querySelector('#preview img');
            note(window.__seen.preview, img && img.src);
        };
        if (window.__observer) window.__observer.disconnect();
        window.__observer = new MutationObserver(look);
        window.__observer.observe(document.body, {subtree: true, childList: true, attributes: true,
                                                  characterData: true});
        look();
    """)


def _generate_and_wait(driver):
    old = _src(driver, "#final")
    _css(driver, "#generate").click()
    _wait(driver, lambda: _counter(driver) == f"group {GROUPS} / {GROUPS}"
          and _src(driver, "#final") not in (None, old))


def _fetch(server, url) -> np.ndarray:
    assert url.startswith(server.url), url
    with urllib.request.urlopen(url, timeout=30) as r:
        return read_png(r.read())


ELEM_IDS = ("class", "seed", "cfg", "generate", "preview", "final", "group_counter", "layout_image",
            "layout_groups", "error", "previews", "download")


def test_page_streams_a_preview_per_group_then_the_final_image(server, browser, models):
    _open(browser, server)
    assert [i for i in ELEM_IDS if not _all(browser, f"#{i}")] == []
    _pick_class(browser, "3: yellow plus")
    _type(browser, "#seed input", "5")
    before = _src(browser, "#preview")
    _record(browser)
    _generate_and_wait(browser)
    seen = browser.execute_script("return window.__seen")
    assert [c for c in seen["counter"] if c != f"group 0 / {GROUPS}"] == [
        f"group {g} / {GROUPS}" for g in range(1, GROUPS + 1)]
    shown = [s for s in seen["preview"] if s != before]
    assert len(shown) == GROUPS, shown  # the preview changed after every group
    previews, final = expected(models, label=3, seed=5)
    for url, want in zip(shown, previews):
        np.testing.assert_array_equal(_fetch(server, url), want)
    np.testing.assert_array_equal(_fetch(server, _src(browser, "#final")), final)
    # the strip of previews and the PNG download
    strip = _fetch(server, _src(browser, "#previews"))
    np.testing.assert_array_equal(strip, np.concatenate(previews, axis=1))
    _css(browser, "#download").click()
    target = browser.downloads / "dar_class3_seed5_n1.png"
    _wait(browser, target.exists, timeout=60)
    np.testing.assert_array_equal(read_png(str(target)), final)
    shot = browser.downloads.parent / "demo.png"
    browser.save_screenshot(str(shot))
    assert read_png(str(shot)).std() > 5
    if os.environ.get("DAR_DEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["DAR_DEMO_SCREENSHOT"])


def test_page_layout_from_an_uploaded_png(server, browser, models, layout_png):
    _open(browser, server)
    _css(browser, "#layout_image input[type=file]").send_keys(str(layout_png))
    _wait(browser, lambda: _src(browser, "#layout_image") is not None)
    _type(browser, "#layout_groups input[type=number]", "2")
    _pick_class(browser, "6: orange square")
    _generate_and_wait(browser)
    assert _css(browser, "#error").text.strip() == ""
    _, final = expected(models, label=6, layout=pipeline.load_image(str(layout_png), 32), k=2)
    np.testing.assert_array_equal(_fetch(server, _src(browser, "#final")), final)


def test_page_bad_input_shows_an_error_and_the_server_keeps_serving(server, browser, models, tmp_path):
    _open(browser, server)
    fake = tmp_path / "holiday.png"
    fake.write_text("not an image at all\n")
    _css(browser, "#layout_image input[type=file]").send_keys(str(fake))
    _wait(browser, lambda: "not an image" in _css(browser, "#error").text)
    _css(browser, "#generate").click()  # generating with it says so too, and draws nothing
    _wait(browser, lambda: "not an image" in _css(browser, "#error").text)
    assert _counter(browser) == f"group 0 / {GROUPS}" and _src(browser, "#final") is None
    _open(browser, server)
    _type(browser, "#cfg textarea", "lots")
    _css(browser, "#generate").click()
    _wait(browser, lambda: "CFG scale: malformed" in _css(browser, "#error").text)
    _type(browser, "#cfg textarea", "4.0")
    _generate_and_wait(browser)
    assert _css(browser, "#error").text.strip() == ""
    np.testing.assert_array_equal(_fetch(server, _src(browser, "#final")), expected(models)[1])
    assert server.health()["status"] == "ok"


def test_two_sessions_at_once_both_finish(server, browser, models):
    _open(browser, server)
    first = browser.current_window_handle
    _type(browser, "#seed input", "11")
    browser.switch_to.new_window("window")
    second = browser.current_window_handle
    _open(browser, server)
    _type(browser, "#seed input", "12")
    for handle in (first, second):
        browser.switch_to.window(handle)
        _css(browser, "#generate").click()
    for handle, seed in ((first, 11), (second, 12)):
        browser.switch_to.window(handle)
        _wait(browser, lambda: _counter(browser) == f"group {GROUPS} / {GROUPS}" and _src(browser, "#final"))
        np.testing.assert_array_equal(_fetch(server, _src(browser, "#final")), expected(models, seed=seed)[1])
    browser.switch_to.window(second)
    browser.close()
    browser.switch_to.window(first)


def test_nothing_is_fetched_from_the_internet(server, browser):
    """Every request the browser made in these tests went to the demo server; the server itself
    tried no outside connection (analytics, version checks, fonts, share links)."""
    _open(browser, server)
    urls = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    assert any(u.startswith(server.url + "/static/fonts/") for u in urls), sorted(urls)[:20]
    outside = sorted(u for u in urls if not u.startswith((server.url + "/", "data:", "blob:")))
    assert not outside, outside
    assert server.guard_log.read_text() == "", server.guard_log.read_text()
    assert server.proc.poll() is None
