"""The paired one-client benchmark: every document goes to both servers, in alternating blocks."""

from __future__ import annotations

import json

import httpx
import pytest

from bench.paired import bootstrap_ratio, main, run_pairs, summary, workload


def test_every_document_goes_to_both_servers_in_alternating_blocks() -> None:
    calls: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["long_document"] == "truncate"
        calls.append((request.url.host, body["input"]))
        return httpx.Response(200, json={"ok": True})

    texts = [f"text {i}" for i in range(7)]
    urls = {"service": "http://service", "naive": "http://naive"}
    rows = run_pairs(urls, texts, passes=2, block=3, transport=httpx.MockTransport(handler))
    assert len(rows) == 2 * len(texts)
    assert [r[1] for r in rows] == [len(t) for t in texts] * 2
    assert {r[0] for r in rows} == set(range(6))  # 3 blocks a pass, numbered across passes
    measured = calls[2 * len(texts) :]  # after each server's warm-up requests
    # Blocks of 3, 3 and 1 texts; who goes first alternates from block to block and pass to pass.
    blocks = [texts[0:3], texts[3:6], texts[6:]]
    expected = []
    for p in range(2):
        for b, chunk in enumerate(blocks):
            order = ["service", "naive"] if (b + p) % 2 else ["naive", "service"]
            expected += [(host, text) for host in order for text in chunk]
    assert measured == expected


def test_summary_and_interval() -> None:
    # The service 1 ms quicker on short texts, 1 ms slower on long ones, in 4 blocks.
    rows = [(i // 5, 500, 0.009, 0.010) for i in range(10)]
    rows += [(2 + i // 5, 5000, 0.051, 0.050) for i in range(10)]
    table = summary(rows)
    assert [r[0] for r in table] == ["0-999", ">= 4096", "all"]
    short, long_, overall = table
    assert short[1:] == [10, 9.0, 10.0, 0.9, -1.0]
    assert long_[1:] == [10, 51.0, 50.0, 1.02, 1.0]
    assert overall[1] == 20
    low, high = bootstrap_ratio(rows, draws=200)
    assert 0.9 - 1e-9 <= low < high <= 1.02 + 1e-9
    assert bootstrap_ratio([(0, 1, 0.002, 0.001)], draws=10) == pytest.approx([2.0, 2.0])


def test_a_fixed_text_replaces_the_test_emails(tmp_path) -> None:
    # With --text the data directory is never read: an empty one would fail to load.
    assert workload(tmp_path, 3, "hello world") == ["hello world"] * 3


def test_an_empty_text_is_a_clear_cli_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--text", "  "])
    assert exit_.value.code == 2
    assert "--text must not be empty" in capsys.readouterr().err
