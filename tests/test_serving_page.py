"""The search page in a real headless Chromium (Debian's /usr/bin/chromium; no
browser is ever downloaded): upload, results, click-to-search, footer, errors.

Skipped, saying how to install it, when Chromium is absent. A screenshot of the
results is saved to /tmp/lookalike_page.png for a human look.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend, load_backend
from lookalike.serving.server import serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]
SCREENSHOT = Path("/tmp/lookalike_page.png")
QUERY_ID = "3/digit_0003.png"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def site(indexed_store) -> Iterator[tuple[str, Path, Backend]]:
    """A live server over conftest's shared tiny store (read only)."""
    workdir = indexed_store.root
    backend = load_backend(workdir)
    with serve_in_thread(create_app(lambda: backend)) as url:
        yield url, workdir, backend


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def result_ids(page) -> list[str]:
    return page.locator("#results .result").evaluate_all("cards => cards.map(c => c.dataset.id)")


def test_upload_results_click_and_footer(site, browser, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    url, workdir, backend = site
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    outside, problems = [], []
    page.on("request", lambda r: r.url.startswith((url, "blob:", "data:")) or outside.append(r.url))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.goto(url)

    footer = page.locator("#footer")
    expect(footer.locator(".model-version")).to_have_text(backend.encoder.version)
    expect(footer.locator(".index-version")).to_have_text(backend.index.version)
    expect(footer).to_contain_text(f"{len(backend.index)} items")

    # Upload a corpus image: it comes back first, marked as the same item.
    page.set_input_files("#file-input", str(workdir / "corpus" / QUERY_ID))
    results = page.locator("#results")
    expect(results).to_have_attribute("data-query", "image:digit_0003.png")
    first = results.locator(".result").first
    expect(first).to_have_attribute("data-id", QUERY_ID)
    expect(first.locator(".badge")).to_have_text("same class")  # the digits model was trained on labelled classes
    assert len(result_ids(page)) == 20  # the page's default k
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img, #preview img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    shown = first.locator("img").bounding_box()
    assert shown["width"] >= 96, "tiny digits must be scaled up to a visible size"
    assert first.locator("img").evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # Clicking a result searches for items like it.
    target = results.locator(".result").nth(1).get_attribute("data-id")
    results.locator(".result").nth(1).click()
    expect(results).to_have_attribute("data-query", f"item:{target}")
    expect(page.locator("#item-id")).to_have_value(target)
    ids = result_ids(page)
    assert target not in ids and ids == [n.id for n in backend.index.similar_to(target, 20)]

    # After a hot swap the footer follows: a response from another index version reloads it.
    page.evaluate("() => { shownIndex = 'i-before-swap'; document.querySelector('#footer .index-version').textContent = 'i-before-swap'; }")
    results.locator(".result").first.click()
    expect(footer.locator(".index-version")).to_have_text(backend.index.version)

    # Typing an id works too; bad input shows the server's reason, not a crash.
    page.fill("#item-id", QUERY_ID)
    page.select_option("#k", "5")
    page.click("#similar-button")
    expect(results).to_have_attribute("data-query", f"item:{QUERY_ID}")
    assert len(result_ids(page)) == 5
    page.fill("#item-id", "9/no_such_digit.png")
    page.click("#similar-button")
    expect(page.locator("#status")).to_have_text("unknown item id '9/no_such_digit.png'")
    expect(results.locator(".result")).to_have_count(0)  # not the previous query's results
    expect(page.locator("#preview")).to_contain_text("no preview")  # not a broken image
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    page.set_input_files("#file-input", str(not_image))
    expect(page.locator("#status")).to_contain_text("not a usable image")
    expect(page.locator("#status")).to_have_attribute("data-state", "error")

    assert outside == [], "the page must not load anything from elsewhere"
    # The two deliberate errors above log failed requests (404, 422); nothing else may fail.
    assert [p for p in problems if "404" not in p and "422" not in p] == []
    page.close()


def republish_as_frames(indexed_store, root: Path, video: str = "clip{}.mp4") -> tuple[Path, list[dict]]:
    """A copy of the tiny store whose items are frames of two videos (``video.format(0 or 1)``), 1.5 s apart."""
    import shutil

    import pyarrow as pa

    from lookalike.index.builder import build_and_publish
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.store import Store

    store = Store.at(root)
    shutil.copytree(indexed_store.root, store.root, symlinks=True)
    index = ItemIndex.load(store.require_current_index())
    items = [
        dict(item, id=f"{video.format(r % 2)}#t={r * 1.5:.1f}", kind="frame", group=video.format(r % 2), timestamp_s=r * 1.5)
        for r, item in enumerate(index.items)
    ]
    build_and_publish(store, index.embeddings, pa.Table.from_pylist(items), model_version=index.model_version)
    return store.root, items


def test_frames_show_their_video_and_timestamp(indexed_store, browser, tmp_path: Path) -> None:
    """Republish the tiny index with some items as video frames; the cards say which video and when."""
    from playwright.sync_api import expect

    root, items = republish_as_frames(indexed_store, tmp_path / "store")
    backend = load_backend(root)
    with serve_in_thread(create_app(lambda: backend)) as url:
        page = browser.new_page()
        page.goto(url)
        target = items[45]["id"]  # clip1.mp4 at 67.5 s
        page.fill("#item-id", target)
        page.click("#similar-button")
        page.locator("#results .result").first.wait_for()
        videos = page.locator("#results .result .video").all_text_contents()
        assert len(videos) == 20 and all(v in ("▶ clip0.mp4", "▶ clip1.mp4") for v in videos), videos
        page.locator("#preview img").wait_for()
        # the preview loads ('#' escaped in its URL); wait for it, it may still be in flight on a busy machine
        page.wait_for_function("() => { const i = document.querySelector('#preview img'); return i.complete && i.naturalWidth > 0; }",
                               timeout=15000)
        assert page.locator("#preview img").evaluate("i => i.complete && i.naturalWidth > 0")
        # "one per video" (offered since the index has frames): only the two clips remain.
        expect(page.locator("#per-video-option")).to_be_visible()
        page.check("#per-video")
        page.click("#similar-button")
        page.wait_for_function("() => document.querySelectorAll('#results .result').length === 2")
        videos = page.locator("#results .result .video").all_text_contents()
        assert sorted(videos) == ["▶ clip0.mp4", "▶ clip1.mp4"]
        assert page.locator("#results .result .time").first.text_content().count(":") == 1  # the time: on the picture
        page.close()
    assert target.startswith("clip1.mp4")


def test_the_tag_box_filters_image_and_item_searches(tagged_store, browser) -> None:
    """conftest's tagged_store: odd digits are tagged 'odd', the 3s also 'three'."""
    backend = load_backend(tagged_store.root)
    with serve_in_thread(create_app(lambda: backend)) as url:
        page = browser.new_page()
        page.goto(url)
        page.fill("#tag", "three")
        page.fill("#item-id", "2/digit_0002.png")
        page.click("#similar-button")
        page.wait_for_function("() => document.querySelectorAll('#results .result').length > 0")
        ids = result_ids(page)
        assert ids and all(i.startswith("3/") for i in ids)
        # each card shows its item's source and tags, every field in its tooltip
        lines = page.eval_on_selector_all("#results .result .meta", "els => els.map(e => [e.textContent, e.title])")
        assert lines and len(lines) == len(ids)
        assert {tuple(line) for line in lines} == {("web · #odd #three", "source: web\ntags: odd, three")}
        page.reload()  # the tag is part of the search's address, like k
        page.wait_for_function("() => document.querySelectorAll('#results .result').length > 0")
        assert page.input_value("#tag") == "three" and result_ids(page) == ids
        page.fill("#tag", " odd, three ,")  # several tags: any of them
        page.set_input_files("#file-input", str(tagged_store.corpus_dir / "0" / "digit_0000.png"))
        page.wait_for_function("() => document.querySelector('#results').dataset.query === 'image:digit_0000.png'")
        ids = result_ids(page)
        assert len(ids) == 20 and {int(i.split("/")[0]) for i in ids} <= {1, 3, 5, 7}
        page.fill("#tag", "")  # the 9s have no metadata: no line on their cards
        page.fill("#item-id", "9/digit_0009.png")
        page.click("#similar-button")
        page.wait_for_function("() => document.querySelector('#results').dataset.query === 'item:9/digit_0009.png'")
        cards = page.eval_on_selector_all("#results .result", "els => els.map(e => [e.dataset.id, !!e.querySelector('.meta')])")
        assert {has for item, has in cards if item.startswith("9/")} == {False}
        assert {has for item, has in cards if not item.startswith("9/")} <= {True}
        page.fill("#tag", "thre")  # a tag no item has: the status says so, not only "0 result(s)"
        page.fill("#item-id", "2/digit_0002.png")
        page.click("#similar-button")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes(\"no item has tag 'thre'\")")
        assert page.text_content("#status").startswith("0 result(s) for ") and not result_ids(page)
        page.close()


# Makes the page's image searches slow (as a big upload is): the request leaves after `ms`.
SLOW_IMAGE_SEARCH = """ms => {
  const fetch0 = window.fetch;
  window.fetch = (url, options) => String(url).includes("/v1/search/image")
    ? new Promise((resolve) => setTimeout(resolve, ms)).then(() => fetch0(url, options))
    : fetch0(url, options);
}"""


def test_a_slow_earlier_search_never_overwrites_a_later_one(site, browser) -> None:
    from playwright.sync_api import expect

    url, workdir, backend = site
    page = browser.new_page()
    page.goto(url)
    page.evaluate(SLOW_IMAGE_SEARCH, 1500)
    page.set_input_files("#file-input", str(workdir / "corpus" / QUERY_ID))  # slow
    other = next(i for i in backend.index.items.ids() if i != QUERY_ID)
    page.fill("#item-id", other)
    page.click("#similar-button")  # fast, and the one the user wants now
    results = page.locator("#results")
    expect(results).to_have_attribute("data-query", f"item:{other}")
    page.wait_for_timeout(2500)  # the upload's answer would have arrived by now
    expect(results).to_have_attribute("data-query", f"item:{other}")
    expect(page.locator("#status")).to_contain_text(f"items like {other}")
    assert result_ids(page) == [n.id for n in backend.index.similar_to(other, 20)]
    page.close()


def test_a_shared_link_shows_the_servers_same_item_meaning_even_before_info_arrives(site, browser) -> None:
    """A ?id= link searches at once, concurrently with /v1/info: results drawn before the
    server's info arrives get their badge text and tooltip redrawn from it (this store's
    model says "same class", not the page's default "same item")."""
    from urllib.parse import quote

    from playwright.sync_api import expect

    url, _, backend = site
    assert backend.encoder.same_item_means == "same class"
    page = browser.new_page()
    held = []
    page.route(lambda u: u.split("?")[0].endswith("/v1/info"), lambda r: held.append(r))  # answered later
    page.goto(f"{url}/?id={quote(QUERY_ID, safe='')}&k=20")
    results = page.locator("#results")
    expect(results).to_have_attribute("data-query", f"item:{QUERY_ID}")
    badges = results.locator(".badge")
    assert badges.count() > 0, "the query's own class is among its neighbours"
    page.wait_for_function("n => document.querySelectorAll('#results .badge').length === n", arg=badges.count())
    assert held, "the page asked for /v1/info"
    held[0].continue_()
    expect(page.locator("#footer .index-version")).to_have_text(backend.index.version)
    threshold = f"{backend.encoder.same_item_threshold:.3f}"
    for text, title in badges.evaluate_all("els => els.map(e => [e.textContent, e.title])"):
        assert text == "same class"
        assert title.startswith(f"distance ≤ {threshold}: within the model's threshold for the same class"), title
    page.unroute_all(behavior="ignoreErrors")
    page.close()


def test_frame_cards_always_show_the_time(indexed_store, browser, tmp_path: Path) -> None:
    """Long video names lose their middle, never the frame's time: a badge on the thumbnail
    and the end of the id and video lines stay visible, on a wide screen and on a phone."""
    root, items = republish_as_frames(indexed_store, tmp_path / "store", "clips/skvideo_bikes_at_the_crossing_{}.mp4")
    backend = load_backend(root)
    with serve_in_thread(create_app(lambda: backend)) as url:
        for width in (1200, 390):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(url)
            page.fill("#item-id", items[45]["id"])
            page.click("#similar-button")
            page.locator("#results .result").first.wait_for()
            cards = page.locator("#results .result").evaluate_all("""cards => cards.map(card => {
              const box = (s) => (s === ".result" ? card : card.querySelector(s)).getBoundingClientRect();
              const inside = (s, outer) => { const b = box(s), o = box(outer); return b.width > 0 && b.left >= o.left - 0.5 && b.right <= o.right + 0.5 && b.top >= o.top - 0.5 && b.bottom <= o.bottom + 0.5; };
              return {id: card.dataset.id, time: card.querySelector(".time").textContent,
                      timeShown: inside(".time", "img"), idTail: card.querySelector(".id .tail").textContent,
                      idTailShown: inside(".id .tail", ".result"), videoTail: card.querySelector(".video .tail").textContent,
                      videoTailShown: inside(".video .tail", ".result"), video: card.querySelector(".video").textContent,
                      clipped: card.querySelector(".video .head").scrollWidth > card.querySelector(".video .head").clientWidth};
            })""")
            page.screenshot(path=str(tmp_path / f"frames_{width}.png"))
            assert len(cards) == 20
            by_id = {item["id"]: item for item in items}
            for card in cards:
                t = by_id[card["id"]]["timestamp_s"]
                clock = f"{int(t // 60)}:{t % 60:05.2f}"
                assert card["time"] == clock and card["timeShown"], card
                assert card["idTail"].endswith(card["id"][card["id"].index("#t="):]) and card["idTailShown"], card
                assert card["videoTail"] == ".mp4" and card["videoTailShown"], card  # the time is on the picture
                assert card["video"] == "▶ " + by_id[card["id"]]["group"].rsplit("/", 1)[-1], card  # the name, not its folder
            assert width > 1000 or any(c["clipped"] for c in cards), "the names are long enough to be cut on a phone"
            page.close()

        # A video's wide frame is letterboxed in the square box: the badges sit on the picture, not in the bands.
        import io

        from PIL import Image

        wide = io.BytesIO()
        Image.new("RGB", (64, 16), (40, 120, 200)).save(wide, "PNG")
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.route(lambda u: u.split("?")[0].endswith("/thumbnail"), lambda r: r.fulfill(body=wide.getvalue(), content_type="image/png"))
        page.goto(url)
        page.fill("#item-id", items[45]["id"])
        page.click("#similar-button")
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)")
        placed = page.locator("#results .result").first.evaluate("""card => {
          const img = card.querySelector("img").getBoundingClientRect();
          const h = img.width * 16 / 64, top = img.top + (img.height - h) / 2, bottom = top + h;
          const on = (s) => { const b = card.querySelector(s).getBoundingClientRect(); return b.top >= top - 0.5 && b.bottom <= bottom + 0.5; };
          return {time: on(".time"), rank: on(".rank")};
        }""")
        assert placed == {"time": True, "rank": True}
        page.screenshot(path=str(tmp_path / "frames_wide.png"))
        page.close()


def test_options_rerun_an_upload_and_id_searches_live_in_the_url(site, browser) -> None:
    from urllib.parse import parse_qs, quote, urlsplit

    from playwright.sync_api import expect

    url, workdir, backend = site
    page = browser.new_page()
    page.goto(url)
    example = page.evaluate("() => fetch('/v1/info').then(r => r.json()).then(i => i.example_item_id)")
    assert backend.index.row_of(example) is not None
    expect(page.locator("#item-id")).to_have_attribute("placeholder", f"e.g. {example}")  # not a digit for every corpus
    expect(page.locator("#per-video-option")).to_be_hidden()  # digits only: no videos to crowd

    # Changing "show" after an upload and pressing Find similar re-runs the image search.
    results = page.locator("#results")
    page.set_input_files("#file-input", str(workdir / "corpus" / QUERY_ID))
    expect(results).to_have_attribute("data-query", "image:digit_0003.png")
    expect(results.locator(".result")).to_have_count(20)
    page.select_option("#k", "5")
    page.click("#similar-button")
    expect(results.locator(".result")).to_have_count(5)
    expect(results).to_have_attribute("data-query", "image:digit_0003.png")

    # An id search is in the address bar, and back goes back to the search before it.
    def query() -> dict[str, list[str]]:
        return parse_qs(urlsplit(page.url).query)

    other = next(i for i in backend.index.items.ids() if i != QUERY_ID)
    page.fill("#item-id", other)
    page.click("#similar-button")
    expect(results).to_have_attribute("data-query", f"item:{other}")
    assert query() == {"id": [other], "k": ["5"]}
    clicked = results.locator(".result").nth(2).get_attribute("data-id")
    results.locator(".result").nth(2).click()
    expect(results).to_have_attribute("data-query", f"item:{clicked}")
    assert query()["id"] == [clicked]
    page.go_back()
    expect(results).to_have_attribute("data-query", f"item:{other}")
    expect(page.locator("#item-id")).to_have_value(other)
    page.go_back()  # the upload: searched again with the kept image
    expect(results).to_have_attribute("data-query", "image:digit_0003.png")
    expect(page.locator("#item-id")).to_have_value("")
    page.go_forward()
    expect(results).to_have_attribute("data-query", f"item:{other}")

    # A shared link opens with its search and options.
    page.goto(f"{url}/?id={quote(QUERY_ID, safe='')}&k=10")
    expect(results).to_have_attribute("data-query", f"item:{QUERY_ID}")
    expect(results.locator(".result")).to_have_count(10)
    expect(page.locator("#k")).to_have_value("10")
    expect(page.locator("#item-id")).to_have_value(QUERY_ID)
    page.close()


def test_any_k_the_api_takes_is_honoured_from_the_address_and_others_are_refused(site, browser) -> None:
    from urllib.parse import quote

    from playwright.sync_api import expect

    url, _, backend = site
    page = browser.new_page()
    similar = []
    page.on("request", lambda r: "/similar" in r.url and similar.append(r.url))
    results, choices = page.locator("#results"), page.locator("#k option")
    link = f"{url}/?id={quote(QUERY_ID, safe='')}&k="

    # A k that is not one of "show"'s choices: searched with it, and added to the menu in order.
    page.goto(link + "7")
    expect(results).to_have_attribute("data-query", f"item:{QUERY_ID}")
    expect(results.locator(".result")).to_have_count(7)
    assert [r.split("/similar?")[1] for r in similar] == ["k=7"]
    expect(page.locator("#k")).to_have_value("7")
    assert choices.all_text_contents() == ["5", "7", "10", "20", "50", "100"]
    page.goto(link + "1")
    expect(results.locator(".result")).to_have_count(1)
    assert choices.all_text_contents() == ["1", "5", "10", "20", "50", "100"]
    assert result_ids(page) == [n.id for n in backend.index.similar_to(QUERY_ID, 1)]

    # A k the API refuses: said so, no search with another k, the id ready for Find similar.
    for bad in ("500", "0", "abc", "2.5"):
        similar.clear()
        page.goto(link + bad)
        expect(page.locator("#status")).to_have_text(
            f'The address asks for k={bad}, but "show" takes a whole number of results from 1 to 100: pick one and press Find similar.')
        expect(page.locator("#status")).to_have_attribute("data-state", "error")
        expect(page.locator("#item-id")).to_have_value(QUERY_ID)
        expect(results.locator(".result")).to_have_count(0)
        assert similar == []
    page.select_option("#k", "5")
    page.click("#similar-button")
    expect(results.locator(".result")).to_have_count(5)
    assert page.url.endswith("&k=5")
    page.close()


def test_feedback_when_the_server_is_down_stuck_or_a_thumbnail_broken(site, browser) -> None:
    from playwright.sync_api import expect

    url, _, backend = site

    # Down: the page says the server cannot be reached (not "Failed to fetch").
    with serve_in_thread(create_app(lambda: backend)) as gone:
        page = browser.new_page()
        page.goto(gone)
        expect(page.locator("#footer .index-version")).to_have_text(backend.index.version)
    page.fill("#item-id", QUERY_ID)
    page.click("#similar-button")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "error")
    expect(status).to_contain_text("Cannot reach the server at " + gone.split("//")[1])
    page.close()

    # Stuck: the old results are marked stale at once, then a timeout says so and clears them.
    page = browser.new_page()
    page.goto(url)
    results, status = page.locator("#results"), page.locator("#status")
    page.fill("#item-id", QUERY_ID)
    page.click("#similar-button")
    expect(results.locator(".result")).to_have_count(20)
    held = []
    page.route(lambda u: "/similar" in u, lambda r: held.append(r))  # never answered
    page.evaluate("() => { searchTimeoutMs = 1500; }")
    results.locator(".result").first.click()
    expect(results).to_have_class("stale")
    expect(status).to_contain_text("Searching")
    expect(status).to_contain_text("did not answer within 1.5 s", timeout=5000)
    expect(status).to_have_attribute("data-state", "error")
    expect(results.locator(".result")).to_have_count(0)
    expect(results).not_to_have_class("stale")
    assert held, "the search was sent"
    page.unroute_all(behavior="ignoreErrors")

    # A thumbnail that does not load: "no preview" in its place, no broken-image icon or alt text.
    page.route(lambda u: "/thumbnail" in u and "/similar" not in u, lambda r: r.fulfill(status=404, body="gone"))
    page.fill("#item-id", QUERY_ID)
    page.click("#similar-button")
    expect(results.locator(".result")).to_have_count(20)
    expect(results.locator(".result .none")).to_have_count(20)
    expect(results.locator(".result img")).to_have_count(0)
    box = results.locator(".result .none").first.bounding_box()
    assert box["width"] >= 96 and abs(box["width"] - box["height"]) < 2, "it keeps the thumbnail's square"
    page.close()


def test_keyboard_search_from_a_result_keeps_focus_on_the_results(site, browser) -> None:
    from playwright.sync_api import expect

    url = site[0]
    page = browser.new_page()
    failing: list[bool] = []  # set below: from then on, searches fail
    # Routed from the start (not only before the search meant to fail), so every search takes the same way.
    page.route(lambda u: "/similar" in u, lambda r: r.fulfill(status=404, json={"detail": "unknown item id 'x'"})
               if failing else r.continue_())
    page.goto(url)
    results = page.locator("#results")
    page.fill("#item-id", QUERY_ID)
    page.press("#item-id", "Enter")
    expect(results.locator(".result")).to_have_count(20)
    expect(page.locator("#status")).to_have_attribute("aria-live", "polite")  # results are announced
    target = results.locator(".result").nth(3)
    target_id = target.get_attribute("data-id")
    target.focus()
    page.keyboard.press("Enter")
    expect(results).to_have_attribute("data-query", f"item:{target_id}")
    first = results.locator(".result").first
    expect(first).to_be_focused()  # not <body>: no tabbing through the form again
    page.keyboard.press("Tab")
    expect(results.locator(".result").nth(1)).to_be_focused()
    page.keyboard.press("Space")  # and again, with Space
    expect(results).not_to_have_attribute("data-query", f"item:{target_id}")
    expect(results.locator(".result").first).to_be_focused()
    # A failed search from a result leaves focus on the message.
    failing.append(True)
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_have_text("unknown item id 'x'")
    expect(page.locator("#status")).to_be_focused()
    page.close()


def test_api_docs_render_offline(site, browser) -> None:
    """/docs (Swagger UI) shows the operations with every request kept on the server
    (FastAPI's default loads it from cdn.jsdelivr.net: a blank page offline)."""
    from playwright.sync_api import expect

    url = site[0]
    page = browser.new_page()
    outside = []

    def local_only(route) -> None:
        if route.request.url.startswith(url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()  # as with no internet

    page.route("**/*", local_only)
    page.goto(url + "/docs")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()  # Swagger UI ran
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert "/v1/search/image" in paths and "/v1/info" in paths
    assert outside == []
    assert page.request.get(url + "/redoc").status == 404  # ReDoc would fetch its logo from cdn.redoc.ly
    page.goto(url + "/")
    expect(page.locator("#footer a[href='/docs']")).to_be_visible()  # the page links the docs
    page.close()


def test_ids_are_searched_exactly_as_indexed(odd_ids_store, browser) -> None:
    """A clicked result or a shared link searches its id as it is, spaces at either end and a
    newline included; only typed text loses its surrounding spaces."""
    from playwright.sync_api import expect

    backend = load_backend(odd_ids_store.root)
    with serve_in_thread(create_app(lambda: backend)) as url:
        page = browser.new_page()
        page.goto(url + "/?id=%20top.png")
        results = page.locator("#results")
        expect(results).to_have_attribute("data-query", "item: top.png")
        expect(page.locator("#item-id")).to_have_value(" top.png")
        assert page.locator("#status").get_attribute("data-state") != "error"
        page.click("#similar-button")  # the box as the search left it: the same id
        expect(page.locator("#status")).to_contain_text("result(s) for items like  top.png")
        for item_id in ("new\nline.png", "tail .png"):
            at = results.locator(".result").evaluate_all("(cards, id) => cards.findIndex(c => c.dataset.id === id)", item_id)
            results.locator(".result").nth(at).click()
            expect(results).to_have_attribute("data-query", f"item:{item_id}")
            expect(results.locator(".result")).to_have_count(len(backend.index) - 1)
        page.fill("#item-id", "  plain.png ")  # typed: trimmed
        page.press("#item-id", "Enter")
        expect(results).to_have_attribute("data-query", "item:plain.png")
        page.close()


def test_empty_query_clock_icon_and_dark_links(site, browser) -> None:
    from playwright.sync_api import expect

    url = site[0]
    page = browser.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.emulate_media(color_scheme="dark")
    page.goto(url)
    expect(page.locator("#footer a").first).to_have_text("API docs")
    # Footer links in the dark theme's accent, not the default blue (1.9:1 on the dark background).
    assert page.locator("#footer a").first.evaluate("a => getComputedStyle(a).color") == "rgb(124, 155, 255)"
    assert not [u for u in requested if u.endswith("/favicon.ico")]  # the icon is inline
    page.click("#similar-button")  # nothing typed, nothing uploaded: say what to do
    expect(page.locator("#status")).to_have_text("Type an item id (one from a result, say), or drop an image above.")
    expect(page.locator("#item-id")).to_be_focused()
    clocks = page.evaluate("[0, 59.994, 59.997, 61.234, 3599.999].map(clock)")
    assert clocks == ["0:00.00", "0:59.99", "1:00.00", "1:01.23", "60:00.00"]
    page.close()


def test_back_and_forward_rerun_the_image_each_entry_searched(site, browser) -> None:
    """Each image search's history entry keeps its own image: back from a later upload
    re-runs the earlier image, not the last one uploaded (whose options URL is the same);
    after a reload the page says the image is gone instead of showing nothing."""
    from playwright.sync_api import expect

    url, workdir, backend = site
    page = browser.new_page()
    page.goto(url)
    results = page.locator("#results")
    first, second = workdir / "corpus" / QUERY_ID, next((workdir / "corpus" / "7").glob("*.png"))
    page.set_input_files("#file-input", str(first))
    expect(results).to_have_attribute("data-query", f"image:{first.name}")
    other = next(i for i in backend.index.items.ids() if i != QUERY_ID)
    page.fill("#item-id", other)
    page.click("#similar-button")
    expect(results).to_have_attribute("data-query", f"item:{other}")
    page.set_input_files("#file-input", str(second))
    expect(results).to_have_attribute("data-query", f"image:{second.name}")
    page.set_input_files("#file-input", str(first))  # same options, same address: still its own entry
    expect(results).to_have_attribute("data-query", f"image:{first.name}")
    page.go_back()
    expect(results).to_have_attribute("data-query", f"image:{second.name}")
    page.go_back()
    expect(results).to_have_attribute("data-query", f"item:{other}")
    page.go_back()
    expect(results).to_have_attribute("data-query", f"image:{first.name}")
    assert result_ids(page)[0] == QUERY_ID
    page.go_forward()
    page.go_forward()
    expect(results).to_have_attribute("data-query", f"image:{second.name}")
    page.reload()
    expect(page.locator("#status")).to_contain_text("no longer kept by this page")
    expect(results.locator(".result")).to_have_count(0)
    # Numbers restart after a reload: the entries before it must not name this load's images.
    page.set_input_files("#file-input", str(second))
    expect(results).to_have_attribute("data-query", f"image:{second.name}")
    page.go_back()
    expect(page.locator("#status")).to_contain_text("no longer kept by this page")
    expect(results.locator(".result")).to_have_count(0)
    page.go_forward()
    expect(results).to_have_attribute("data-query", f"image:{second.name}")
    page.close()


def test_the_footer_fills_in_once_a_loading_server_is_ready(site, browser) -> None:
    """Opened while the server still loads (503 with Retry-After), the footer says so and asks
    again until the server answers, instead of staying "unavailable" until a search."""
    import threading

    from playwright.sync_api import expect

    _, _, backend = site
    loaded = threading.Event()

    def slow_load() -> Backend:
        loaded.wait(60)
        return backend

    with serve_in_thread(create_app(slow_load, load_in_background=True)) as url:
        page = browser.new_page()
        page.goto(url)
        footer = page.locator("#footer")
        expect(footer).to_contain_text("still loading")
        expect(footer).to_contain_text("asking again in 2 s")
        loaded.set()
        expect(footer.locator(".index-version")).to_have_text(backend.index.version, timeout=15_000)
        expect(page.locator("#item-id")).to_have_attribute("placeholder", re.compile(r"^e\.g\. "))
        page.close()
