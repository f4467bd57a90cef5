"""The SpamAssassin baseline: real SpamAssassin on the corpus sample, the skip where it is absent,
and its row in the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.data import read_split
from model.sa_baseline import main, missing_reason, spamassassin_baseline, to_message

needs_sa = pytest.mark.skipif(
    missing_reason() is not None,
    reason=f"needs SpamAssassin: {missing_reason()}",
)


def test_message_is_the_subject_header_and_the_body() -> None:
    raw = to_message("Cheap pills – today\n\nBuy now.\n\nReally.").decode()
    head, _, body = raw.partition("\n\n")
    assert head.startswith("Subject: =?utf-8?")  # non-ASCII subject, RFC 2047 encoded
    assert "charset=utf-8" in head and body == "Buy now.\n\nReally.\n"
    # A first paragraph of several lines cannot be a subject: it stays in the body.
    raw = to_message("line one\nline two\n\nmore").decode()
    assert raw.startswith("Subject: \n") and raw.endswith("\n\nline one\nline two\n\nmore\n")
    # Neutral sender headers, and a Message-ID per text: sa-learn tells messages apart by it.
    assert "\nFrom: sender@example.com\n" in raw and "\nDate: " in raw
    assert _message_id(raw) != _message_id(to_message("other text").decode())


def _message_id(raw: str) -> str:
    return next(h for h in raw.splitlines() if h.startswith("Message-ID: "))


def test_without_spamassassin_the_baseline_is_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sa-learn, spamassassin or perl on it
    r = spamassassin_baseline({}, ["spam"])
    assert r == {"skipped": "`sa-learn` is not installed (Debian: apt-get install spamassassin)"}
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text(
            json.dumps({"id": "a", "text": "hi", "label": "ham", "group": "g"}) + "\n"
        )
    out = tmp_path / "sa.json"
    assert main(["--data", str(data), "--out", str(out)]) == 0
    assert "SpamAssassin baseline skipped: `sa-learn` is not installed" in capsys.readouterr().out
    assert "skipped" in json.loads(out.read_text())


def test_card_shows_the_spamassassin_row_or_says_it_was_skipped(tmp_path: Path) -> None:
    from model.card import render_card

    def report(f1: float, threshold: float, ece: float | None) -> dict[str, object]:
        return {
            "n": 10,
            "f1": f1,
            "precision": 0.9,
            "recall": 0.8,
            "accuracy": 0.9,
            "roc_auc": 0.95,
            "false_positive_rate": 0.1,
            "calibration_error": ece,
            "threshold": threshold,
            "confusion_matrix": {"tn": 4, "fp": 1, "fn": 1, "tp": 4},
            "flag_rate_by_group": {"hard-ham-1": {"n": 4, "flagged": 1, "rate": 0.25}},
        }

    sa = {
        **report(0.9, 2.6, None),
        "spamassassin_version": "4.0.1",
        "bayes_trained_on": {"nspam": 30, "nham": 40},
        "at_default_threshold": report(0.6, 5.0, None),
    }
    metrics = {
        "model": report(0.8, 0.5, 0.01),
        "model_chunked": {**report(0.8, 0.5, 0.01), "documents_longer_than_n_max": 0},
        "baseline_tfidf_logreg": report(0.85, 0.4, 0.02),
        "baseline_spamassassin": sa,
    }
    metrics["model_chunked"]["chunk_overlap"] = 16
    (tmp_path / "config.json").write_text(json.dumps({"labels": ["ham", "spam"]}))
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    card = render_card(tmp_path)
    assert "| SpamAssassin 4.0.1 (rules + Bayes) | 0.9000 |" in card
    assert "| n/a | 2.600 |" in card  # no calibration error for rule points
    assert "(30 spam, 40 ham" in card and "default of 5.0 gives spam F1 0.6000" in card

    metrics["baseline_spamassassin"] = {"skipped": "`sa-learn` is not installed"}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    card = render_card(tmp_path)
    assert "SpamAssassin baseline skipped: `sa-learn` is not installed." in card
    assert "| SpamAssassin" not in card


@pytest.mark.slow
@needs_sa
def test_real_spamassassin_learns_the_train_split_and_scores_the_others(
    tiny_data: Path, tmp_path: Path
) -> None:
    splits = {s: read_split(tiny_data, s) for s in ("train", "validation", "test")}
    # The sample is far below Bayes's default minimum of 200 spam and 200 ham to learn from.
    low = ["bayes_min_spam_num 10", "bayes_min_ham_num 10"]
    home = Path.home() / ".spamassassin"
    had_home = home.exists()
    r = spamassassin_baseline(splits, ["spam"], {"hard-ham-1": 0.5}, tmp_path, extra_cf=low)
    n_spam = sum(e.label == "spam" for e in splits["train"])
    assert r["bayes_trained_on"]["nspam"] == n_spam
    assert r["bayes_trained_on"]["nham"] == len(splits["train"]) - n_spam
    assert r["bayes_rule_hit_rate"]["test"] == 1.0  # the private database was used when scoring
    assert r["n"] == len(splits["test"]) and r["roc_auc"] > 0.7
    assert r["at_default_threshold"]["threshold"] == 5.0 and r["calibration_error"] is None
    assert home.exists() == had_home  # nothing written to the user's SpamAssassin directory
    # Cached by the data's hash: the second call reads the scores back.
    cached = list(tmp_path.glob("*.json"))
    assert [p.stem for p in cached] == [r["data_key"]]
    again = spamassassin_baseline(splits, ["spam"], {"hard-ham-1": 0.5}, tmp_path, extra_cf=low)
    assert again["seconds"] == r["seconds"] and again["f1"] == r["f1"]
