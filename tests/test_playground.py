"""The playground page in a real browser: Debian's chromium, headless, driven by Playwright for Python, against a
`hub serve` process on 127.0.0.1. Every request the page makes to anything but that server is aborted; every
wait is bounded. `make test` installs chromium when it is missing (apt-get); set HUB_CHROMIUM to use another.
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlparse

import pytest

from hub.store.local import AdapterStore
from tests.test_server import ADMIN_TOKEN, Server, publish
from tests.test_vae_serving import export_vae

WAIT_MS = 30_000
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions"]


def chromium_path() -> str:
    path = os.environ.get("HUB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium), "
                    "or set HUB_CHROMIUM to a Chromium binary")
    return path


@pytest.fixture(scope="module")
def served(trained_run, tiny_base, tmp_path_factory):
    """A server with the same trained adapter under two names, so compare mode has two tasks, and a sentence VAE."""
    folder = tmp_path_factory.mktemp("playground")
    store = folder / "store"
    for name in ("e2e", "e2e-b"):
        publish(trained_run, store, name)
    AdapterStore(store).publish(export_vae(tiny_base, folder / "vae-run", "block_output"), name="vae")
    server = Server(store, tiny_base, folder / "server.log", "--watch-interval", "0.2", admin_token=ADMIN_TOKEN)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    server_host = urlparse(served.url).netloc
    context.route("**/*", lambda route: route.continue_() if urlparse(route.request.url).netloc == server_host
                  else route.abort())
    page = context.new_page()
    page.on("console", lambda message: print(f"browser console: {message.type}: {message.text}"))
    page.on("pageerror", lambda error: print(f"browser page error: {error}"))
    page.goto(served.url + "/")
    page.wait_for_selector("#task-table tbody tr[data-task='e2e']")
    yield page
    context.close()


def answer(page, pane: str) -> tuple[str, str]:
    """Wait until the pane's request ended; return its text and its stats line."""
    from playwright.sync_api import TimeoutError

    try:
        page.wait_for_function(f"""() => {{
            const stats = document.querySelector('#{pane} .stats').textContent;
            return stats.startsWith('finish:') || stats.includes('refused') || stats.startsWith('stopped');
        }}""")
    except TimeoutError:
        pytest.fail(f"{pane} did not finish: text {page.inner_text(f'#{pane} .text')!r}, "
                    f"stats {page.inner_text(f'#{pane} .stats')!r}, error {page.inner_text('#error')!r}")
    return page.inner_text(f"#{pane} .text"), page.inner_text(f"#{pane} .stats")


def set_max_tokens(page, n: int) -> None:
    page.fill("input[name=max_new_tokens]", str(n))


def test_page_lists_the_tasks_with_type_version_and_share(page):
    rows = page.locator("#task-table tbody tr")
    assert rows.count() == 3 and rows.nth(2).locator("td").all_inner_texts()[:2] == ["vae", "sentence_vae"]
    cells = rows.first.locator("td").all_inner_texts()
    assert cells[0] == "e2e" and cells[1] == "e2e" and cells[2].startswith("1 of 1") and cells[3].endswith("%")
    assert "eval_loss" in cells[4]  # the held-out loss recorded at training
    assert page.get_attribute("#task-table tbody tr >> nth=0 >> a", "href") == "/v1/tasks/e2e/training-curve.png"


def test_e2e_answer_streams_into_the_page(page):
    streamed = []
    page.on("response", lambda r: streamed.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/generate") else None)
    assert "name[The Eagle]" in page.inner_text("#mr-preview")
    set_max_tokens(page, 12)
    page.click("#send")
    text, stats = answer(page, "answer-a")
    assert stats.startswith("finish: ") and "tokens/s" in stats and "first token" in stats, stats
    assert text.strip(), "no text streamed into the answer"
    assert streamed and streamed[0].startswith("text/event-stream")
    assert page.inner_text("#answer-a h3") == "e2e@1"


def test_too_long_input_shows_the_servers_422_message(page):
    page.fill(".slot-value >> nth=0", "The Eagle " * 200)
    page.click("#send")
    text, stats = answer(page, "answer-a")
    assert "refused" in stats
    assert text.startswith("422:") and "too long" in text and "128" in text, text


def test_compare_mode_shows_two_answers_and_a_screenshot_is_saved(page, tmp_path):
    page.check("#compare")
    page.select_option("#task-b", "e2e-b")
    set_max_tokens(page, 8)
    page.click("#send")
    first, second = answer(page, "answer-a"), answer(page, "answer-b")
    assert first[1].startswith("finish:") and second[1].startswith("finish:")
    assert page.inner_text("#answer-b h3") == "e2e-b@1"
    assert first[0] == second[0]  # the same weights under two names, greedy: the same answer
    shot = page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {tmp_path / 'playground.png'}")


def test_composing_two_adapters_sends_the_block_and_names_them(page):
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/generate") else None)
    page.click("#composition summary")
    assert [o for o in page.locator(".compose-task >> nth=0 >> option").all_inner_texts() if "vae" in o] == []
    page.select_option("#compose-block", "average")
    page.fill("#compose-first-weight", "3")
    page.select_option(".compose-task >> nth=0", "e2e-b")
    set_max_tokens(page, 6)
    page.click("#send")
    text, stats = answer(page, "answer-a")
    assert stats.startswith("finish:"), (text, stats)
    assert page.inner_text("#answer-a h3") == "average of e2e@1 + e2e-b@1"
    assert sent[-1]["compose"] == {"average": [{"task": "e2e", "weight": 3}, {"task": "e2e-b", "weight": 1}]}
    page.select_option("#compose-block", "stack")
    page.select_option(".compose-task >> nth=0", "")
    page.click("#send")
    assert "at least one more adapter" in page.inner_text("#error")


def test_training_curve_and_live_metrics(page):
    page.click("#task-table tbody tr >> nth=0 >> a")
    page.wait_for_function("() => document.querySelector('#curve img').naturalWidth > 0")
    page.wait_for_function("() => document.querySelector('#m-queue').textContent !== '–'")
    assert page.inner_text("#m-batch").isdigit() and page.inner_text("#m-resident") == "3"


def test_admin_actions_need_a_token_and_show_the_servers_answer(page):
    assert page.is_hidden("#admin-actions")
    page.fill("#admin-token", "wrong")
    page.click("#admin-token-form button")
    page.click("#admin-reload")
    page.wait_for_function("() => document.querySelector('#admin-result').textContent.startsWith('401')")
    page.fill("#admin-token", ADMIN_TOKEN)
    page.click("#admin-token-form button")
    page.click("#admin-reload")
    page.wait_for_function("() => document.querySelector('#admin-result').textContent.includes('loaded')")


def test_a_sentence_vae_gets_its_own_form_and_answers_an_interpolation(page):
    page.select_option("#task-a", "vae")
    page.select_option("select[name=operation]", "interpolate")
    assert page.is_visible("textarea[name=b]") and page.is_hidden("textarea[name=c]")
    page.fill("input[name=steps]", "3")
    set_max_tokens(page, 4)
    page.click("#send")
    page.wait_for_function("() => /texts? ·|refused/.test(document.querySelector('#answer-a .stats').textContent)")
    assert page.inner_text("#answer-a .stats").startswith("3 texts"), page.inner_text("#answer-a .text")
    assert [line[:3] for line in page.inner_text("#answer-a .text").splitlines()] == ["0. ", "1. ", "2. "]
    page.fill("input[name=steps]", "500")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('#answer-a .stats').textContent.includes('refused')")
    assert page.inner_text("#answer-a .text").startswith("422:")


def test_every_task_types_form_builds_the_input_its_task_reads(page):
    inputs = page.evaluate("""async () => {
        const { createForm } = await import('/static/js/forms.js');
        const read = (type) => {
            try { return createForm(type, document.createElement('div')).read(); }
            catch (err) { return `error: ${err.message}`; }
        };
        return Object.fromEntries(['e2e', 'persona', 'coqa', 'translate', 'text2text'].map((t) => [t, read(t)]));
    }""")
    assert inputs["e2e"].startswith("name[The Eagle], eatType[coffee shop]")
    assert inputs["persona"] == {"persona": ["i love to cook.", "i have two dogs."],
                                 "history": ["hi! what do you like to do?"]}
    assert set(inputs["coqa"]) == {"story", "history", "question"} and inputs["coqa"]["history"] == []
    assert inputs["translate"] and inputs["text2text"] == "error: the input is empty"
