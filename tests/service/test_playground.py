"""The review page: served self-contained, and driven in a real browser (Debian's chromium through
Playwright) against a real server process with the shipped model."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from service_testing import make_settings, serving
from test_e2e_server import Server

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "model" / "artifacts" / "spamassassin-linformer"
SCREENSHOT = REPO / "docs" / "playground.png"
CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if Path(p).is_file()), None
)


async def test_the_page_is_one_self_contained_file_open_without_a_key(fake_artifact: Path) -> None:
    settings = make_settings(fake_artifact, api_keys=["k1"])
    config = ArtifactConfig.from_dir(fake_artifact)
    async with serving(create_app(settings, engine=FakeEngine(config))) as client:
        r = await client.get("/playground")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["content-security-policy"]
        page = r.text
        # Nothing is fetched from elsewhere: no src or href to another origin, no import.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
        assert "@import" not in page and "<link" not in page
        assert "/v1/classify" in page and "/v1/models" in page
        assert (await client.post("/v1/classify", json={"input": "x"})).status_code == 401


def _long_spam(sample: Path) -> str:
    """Mailing-list ham around a block of spam messages, all from the committed corpus sample."""
    rows = [
        json.loads(line)
        for split in ("train", "validation", "test")
        for line in (sample / f"{split}.jsonl").read_text(encoding="utf-8").split("\n")
        if line
    ]
    ham = "\n\n".join(r["text"] for r in rows if r["group"] == "easy-ham-1")
    spam = "\n\n".join(sorted((r["text"] for r in rows if r["label"] == "spam"), key=len)[::-1])
    return f"{ham[:9000]}\n\n{spam[:14000]}\n\n{ham[-9000:]}"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model.onnx").exists(), reason="no shipped model here")
def test_a_long_spam_message_is_highlighted_in_a_real_browser(
    tiny_data: Path, tmp_path: Path
) -> None:
    if CHROMIUM is None or not _have_playwright():
        if os.environ.get("CI") == "true":
            pytest.fail(
                "CI must run the browser test: apt-get install chromium, pip install .[dev]"
            )
        pytest.skip("needs chromium (apt-get install chromium) and playwright (the dev extra)")
    from playwright.sync_api import sync_playwright

    text = _long_spam(tiny_data)
    server = Server(SHIPPED, tmp_path, "--no-jobs", "--request-timeout-s", "300")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/playground")
            page.fill("#text", text)
            page.click("#go")
            page.wait_for_selector("#doc mark.flagged", timeout=240_000)
            assert page.inner_text("#verdict").startswith("Flagged")
            marks = page.locator("#doc mark.flagged")
            assert marks.count() >= 1
            pieces = marks.all_text_contents()
            sent = text.replace("\r\n", "\n")
            assert all(piece in sent for piece in pieces)
            assert sum(len(piece) for piece in pieces) > 1000
            items = page.locator("#spans li")
            assert items.count() >= 3
            scores = [
                float(s.rstrip("%")) for s in page.locator("#spans li .score").all_inner_texts()
            ]
            assert scores == sorted(scores, reverse=True)
            assert page.locator(".bar").count() == 2
            page.locator("#spans li").first.click()
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=False)
            assert not errors, errors
            browser.close()
        if os.environ.get("LINMOD_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        server.stop()


def _have_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True
