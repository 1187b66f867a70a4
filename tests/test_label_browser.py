"""The web page in Debian's Chromium (Playwright): log in, rank with the keyboard, isolation, escaping, review tab."""

import json
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from sqlalchemy import select

from align.bench_label import LabelServer
from labeling_ui.auth import hash_password
from labeling_ui.schema import Annotation, User
from labeling_ui.store import Store
from rm.tags.taxonomy import Tag, Taxonomy

SHOTS = Path(__file__).parent / "screenshots"
EVIL = 'Sure. <script>window.pwned = true</script> <img src=x onerror="window.pwned = true">'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label-ui")
    db = f"sqlite:///{tmp / 'labels.db'}"
    store = Store(db)
    for name, role in (("alice", "annotator"), ("bob", "annotator"), ("rita", "reviewer")):
        store.add_user(name, role, hash_password(f"{name}-secret"))
    prompt = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Show me a loop in Python.\n\n```python\nfor i in range(3):\n    print(i)\n```"},
    ]
    store.import_tasks(
        "demo",
        [{"prompt": prompt, "responses": [EVIL, "**Bold** answer", "A plain answer"], "tags": ["code"]}],
        overlap=2,
        guidelines="# Guidelines\nPrefer *correct* answers.",
    )
    store.add_members("demo", ["alice", "bob", "rita"])
    taxonomy = tmp / "taxonomy.yaml"
    taxonomy.write_text(json.dumps({"tags": [{"id": "code"}, {"id": "math"}, {"id": "safety"}]}))
    built = Taxonomy([Tag("programming", "Programming"),
                      Tag("python programming", "python programming", "programming",
                          ["Python Programming", "python programs", "python coding"]),
                      Tag("cooking", "cooking", None, ["<b>baking</b>"])], "built")  # fmt: skip
    merges = [{"step": "rule", "into": "python programming", "merged": ["python programs"], "evidence": "stems"},
              {"step": "semantic", "into": "python programming", "merged": ["python coding"],
               "evidence": "MiniLM embeddings within cosine distance 0.3 (DBSCAN)"}]  # fmt: skip
    examples = {"python coding": ["Write a <script>window.pwned = true</script> loop in Python"],
                "python programming": ["How do I read a file in Python?"]}  # fmt: skip
    counts = {"python programming": 30, "python coding": 12, "python programs": 4, "cooking": 9}
    store.import_taxonomy("instag", built, merges, [], examples, counts)
    srv = LabelServer(db, tmp / "server.log", taxonomy).start()
    yield srv, store
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
        yield b
        b.close()


def login(browser, url, name, password):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    return page


def stored(store, name):
    with store.sessions() as s:
        return [
            (a.task_id, a.ranks, a.skipped)
            for a in s.scalars(select(Annotation).join(User, User.id == Annotation.user_id).where(User.name == name))
        ]


@pytest.mark.slow
def test_wrong_password_is_refused(server, browser):
    srv, _ = server
    page = login(browser, srv.url, "alice", "not-her-password")
    page.wait_for_timeout(1500)
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "label_wrong_password.png"))
    assert page.query_selector("#conversation") is None
    assert page.get_by_role("button", name="Login").is_visible()
    page.close()


@pytest.mark.slow
def test_annotator_ranks_with_keyboard_and_sees_no_one_elses_answer(server, browser):
    srv, store = server
    page = login(browser, srv.url, "alice", "alice-secret")
    page.wait_for_selector("#responses .response", timeout=30000)
    # the conversation is rendered as chat, code highlighted, and the response's HTML shown as text, not run
    assert "Show me a loop" in page.inner_text("#conversation")
    assert page.query_selector("#conversation pre code .k, #conversation pre code .kn, #conversation pre code span")
    assert "<script>window.pwned = true</script>" in page.inner_text("#responses")
    assert page.evaluate("window.pwned") is None
    assert "Prefer" in page.inner_text("#guidelines")
    assert page.query_selector("text=Review") is None or not page.get_by_role("tab", name="Review").is_visible()

    page.click("#who")  # focus on the page, not on a text field
    for key in "312":
        page.keyboard.press(key)
    assert page.input_value("#ranks textarea") == "3 1 2"
    page.screenshot(path=str(SHOTS / "label_ranking.png"), full_page=True)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Saved')", timeout=20000)
    page.screenshot(path=str(SHOTS / "label_submitted.png"), full_page=True)
    assert stored(store, "alice") == [(1, [3, 1, 2], False)]
    assert "Nothing left" in page.inner_text("#status")
    page.close()

    # bob gets the same item (overlap 2) with an empty ranking, and nothing of alice's answer
    page = login(browser, srv.url, "bob", "bob-secret")
    page.wait_for_selector("#responses .response", timeout=30000)
    page.wait_for_timeout(500)
    assert page.input_value("#ranks textarea") == ""
    body = page.inner_text("body")
    assert "alice" not in body and "3 1 2" not in body
    page.click("#who")
    page.keyboard.press("s")  # S skips
    page.wait_for_function("document.querySelector('#status').innerText.includes('Skipped')", timeout=20000)
    assert stored(store, "bob") == [(1, None, True)]
    page.keyboard.press("u")  # U undoes the skip: the item is back
    page.wait_for_function("document.querySelector('#status').innerText.includes('Undid')", timeout=20000)
    assert stored(store, "bob") == []
    assert "Show me a loop" in page.inner_text("#conversation")
    page.close()


@pytest.mark.slow
def test_reviewer_sees_agreement(server, browser):
    srv, _ = server
    page = login(browser, srv.url, "rita", "rita-secret")
    page.get_by_role("tab", name="Review").click()
    page.click("#refresh")
    page.wait_for_function("document.querySelector('#agreement').innerText.includes('Kendall')", timeout=20000)
    page.screenshot(path=str(SHOTS / "label_review.png"), full_page=True)
    assert "ranked items" in page.inner_text("#agreement")
    page.close()


@pytest.mark.slow
def test_reviewer_reviews_the_taxonomy(server, browser):
    """Search, inspect (example prompts and merge evidence shown as text), rename, undo a merge, see the versions
    with their author, export the file; an annotator has no Taxonomy tab."""
    srv, store = server
    page = login(browser, srv.url, "rita", "rita-secret")
    page.get_by_role("tab", name="Taxonomy").click()
    page.wait_for_function("document.querySelector('#taxonomy-status').innerText.includes('Version 1')", timeout=30000)
    page.fill("#tag-search textarea, #tag-search input", "python")
    page.click("#tag-search-btn")
    page.wait_for_function("document.querySelector('#taxonomy-status').innerText.includes('1 tag(s)')", timeout=20000)
    page.locator("#tag-table").get_by_text("python programming", exact=True).locator("visible=true").first.click()
    page.wait_for_function("(document.querySelector('#tag-details') || {innerText: ''}).innerText.includes('Merges')",
                           timeout=20000)  # fmt: skip
    details = page.inner_text("#tag-details")
    assert "<script>window.pwned = true</script>" in details and page.evaluate("window.pwned") is None
    assert "DBSCAN" in details and "python coding (12)" in details
    page.fill("#new-name textarea, #new-name input", "Python")
    page.click("#rename")
    page.wait_for_function("document.querySelector('#taxonomy-status').innerText.includes('version 2')", timeout=20000)
    page.click("#merge input")
    page.get_by_text("#1: python coding").locator("visible=true").first.click()
    page.click("#undo-merge")
    page.wait_for_function("document.querySelector('#taxonomy-status').innerText.includes('version 3')", timeout=20000)
    page.wait_for_function("document.querySelector('#tax-versions').innerText.includes('undo_merge')", timeout=20000)
    assert "undone, or not undoable here" in page.inner_text("#tag-details")  # and no longer offered
    page.screenshot(path=str(SHOTS / "label_taxonomy.png"), full_page=True)
    assert page.inner_text("#tax-versions").count("rita") == 2
    version, tax = store.taxonomy_version("instag")
    assert (
        version == 3
        and tax.tags["python programming"].name == "Python"
        and tax.resolve("python coding") == "python coding"
    )
    page.click("#tax-export")
    page.wait_for_selector("#tax-file a", timeout=20000)
    with page.expect_download() as download:
        page.click("#tax-file a")
    exported = Taxonomy.load(download.value.path().rename(download.value.path().with_suffix(".yaml")))
    assert exported.tags["python programming"].name == "Python" and "python coding" in exported.tags
    page.close()
    page = login(browser, srv.url, "alice", "alice-secret")
    page.wait_for_selector("#responses", timeout=30000)
    assert page.query_selector("text=Taxonomy") is None or not page.get_by_role("tab", name="Taxonomy").is_visible()
    page.close()


@pytest.mark.slow
def test_page_sessions_expire_and_end_when_the_account_is_disabled(tmp_path, browser):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    store = Store(db)
    for name in ("alice", "bob"):
        store.add_user(name, "annotator", hash_password(f"{name}-secret"))
    store.import_tasks("demo", [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(4)], overlap=1)
    store.add_members("demo", ["alice", "bob"])
    srv = LabelServer(db, tmp_path / "server.log", extra=("--session-hours", str(8 / 3600))).start()
    try:
        page = login(browser, srv.url, "alice", "alice-secret")
        page.wait_for_selector("#responses .response", timeout=30000)
        t0 = time.monotonic()  # alice logged in before this
        bob = login(browser, srv.url, "bob", "bob-secret")
        bob.wait_for_selector("#responses .response", timeout=30000)
        Store(db).set_disabled("bob", True)  # from another process's view, as `align label users disable` does
        bob.click("#skip")
        bob.wait_for_selector("text=please log in again", timeout=20000)
        page.wait_for_timeout(max(0.0, 8.5 - (time.monotonic() - t0)) * 1000)
        page.click("#skip")
        page.wait_for_selector("text=session has expired", timeout=20000)
        assert [a for a in stored(store, "alice") if a[2]] == [] and stored(store, "bob") == []
    finally:
        srv.stop()
