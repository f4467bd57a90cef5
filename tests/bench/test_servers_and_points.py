"""The naive comparison server against the offline engine, and one attention point in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.attention_point import run_point
from bench.common import encode
from bench.naive_server import create_app
from bench.runners import ort_runner, run_all
from service.artifact import flag_scores, softmax


def test_attention_point_reports_latency_and_peak() -> None:
    sizes = {"vocab_size": 100, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32,
             "sharing": "layerwise"}  # fmt: skip
    for variant in ("linformer-k128", "full-math"):
        point = {"variant": variant, "runtime": "pytorch", "n": 48, "sizes": sizes,
                 "threads": 1, "repeats": 1}  # fmt: skip
        got = run_point(point)
        assert set(got) == {"latency_ms", "peak_mib", "runs"} and got["runs"] == 2
        assert got["latency_ms"] > 0 and (math.isnan(got["peak_mib"]) or got["peak_mib"] >= 0)


@pytest.mark.slow
def test_naive_server_decides_like_the_offline_engine(tiny_artifact: Path) -> None:
    from fastapi.testclient import TestClient

    cfg = json.loads((tiny_artifact / "config.json").read_text())
    texts = ["win a free prize, click now", "the meeting agenda for monday " * 40]
    with TestClient(create_app(tiny_artifact, "fp32", threads=1)) as client:
        assert client.get("/ready").status_code == 200
        response = client.post("/v1/classify", json={"input": texts, "long_document": "truncate"})
    assert response.status_code == 200
    got = response.json()["results"]
    full = encode(tiny_artifact, texts)
    seqs = [ids[: cfg["n_max"]] for ids in full]
    run = ort_runner(tiny_artifact, "fp32", threads=1)
    assert run is not None
    logits, _, _ = run_all(run, seqs, cfg["pad_id"], [[0], [1]])
    flagged = flag_scores(softmax(logits), cfg["labels"], cfg["flag_labels"]) >= cfg["threshold"]
    assert [r["flagged"] for r in got] == list(np.asarray(flagged))
    assert [r["tokens"] for r in got] == [len(ids) for ids in full]
    assert [r["truncated"] for r in got] == [len(ids) > cfg["n_max"] for ids in full]


def record_runs(engine: Any) -> list[tuple[int, int]]:
    """The shape of every run the engine makes from now on; the runs themselves are real."""
    runs: list[tuple[int, int]] = []
    real = engine.run

    def run(ids: np.ndarray, mask: np.ndarray, solo: bool = False) -> np.ndarray:
        runs.append(ids.shape)
        return real(ids, mask)

    engine.run = run
    return runs


@pytest.mark.slow
def test_offline_reference_measures_its_schedules_again_on_the_same_sessions(
    tiny_artifact: Path,
) -> None:
    from bench.load_offline import OfflineReference, median_results

    cfg = json.loads((tiny_artifact / "config.json").read_text())
    texts = ["win a free prize, click now", "the meeting agenda for monday " * 40, "hello"]
    seqs = [ids[: cfg["n_max"]] for ids in encode(tiny_artifact, texts)]
    reference = OfflineReference(tiny_artifact, "fp32", 1, seqs)
    runs = record_runs(reference._engine)
    try:
        first = reference.measure()
        assert len(runs) == 2 * len(texts)  # one per core: a warm pass, then the measured one
        again = [reference.measure() for _ in range(2)]
    finally:
        reference.close()
    assert len(runs) == 4 * len(texts)  # measured again without warming again
    assert sorted(runs) == sorted([(1, len(s)) for s in seqs] * 4)  # one document per run
    names = [o.name for o in first]
    assert names[:2] == ["length-sorted batches (1 threads)", "one per run (1 threads)"]
    assert names[2].startswith("one per core (") and names[2].endswith(", 1 thread each)")
    assert all(o.docs_per_s > 0 and o.cpu_ms_per_doc >= 0 for o in first + again[0])
    medians = median_results([first, *again])
    for i, m in enumerate(medians):
        rates = sorted(r[i].docs_per_s for r in [first, *again])
        assert m.name == names[i] and m.docs_per_s == rates[1]


@pytest.mark.slow
def test_offline_steadiness_writes_every_pass_and_the_spread(
    tiny_artifact: Path, tiny_data: Path, tmp_path: Path
) -> None:
    import csv

    from bench import load_offline

    argv = ["--model-dir", str(tiny_artifact), "--data", str(tiny_data), "--precision", "fp32",
            "--docs", "6", "--passes", "3", "--pause", "0", "--threads", "1",
            "--out", str(tmp_path)]  # fmt: skip
    assert load_offline.main(argv) == 0
    with (tmp_path / "offline.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["pass"]) for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len({r["schedule"] for r in rows}) == 3
    assert all(float(r["docs_per_s"]) > 0 for r in rows)
    text = (tmp_path / "offline.md").read_text()
    assert "python -m bench.load_offline" in text and "3 passes in turn" in text
    for name in {r["schedule"] for r in rows}:
        rates = [float(r["docs_per_s"]) for r in rows if r["schedule"] == name]
        assert f"| {name} |" in text
        assert max(rates) / min(rates) >= 1.0


@pytest.mark.slow
def test_text_schedules_tokenize_each_text_and_run_it_alone_cut_to_n_max(
    tiny_artifact: Path,
) -> None:
    from bench.load_offline import TextSchedules

    cfg = json.loads((tiny_artifact / "config.json").read_text())
    texts = ["win a free prize, click now", "the meeting agenda for monday " * 400, "hello"]
    full = encode(tiny_artifact, texts)
    assert len(full[1]) > cfg["n_max"]  # one text is cut
    schedules = TextSchedules(tiny_artifact, "fp32", texts, cfg["n_max"])
    runs = record_runs(schedules._engine)
    try:
        first = schedules.measure()  # each schedule warmed, then measured: 2 passes each
        second = schedules.measure_reversed()  # measured once each
    finally:
        schedules.close()
    expected = [(1, min(len(ids), cfg["n_max"])) for ids in full]
    assert sorted(runs) == sorted(expected * 6)
    names = [o.name for o in first]
    assert names[0].startswith("text: ") and "feeding the engine's" in names[0]
    assert names[1].startswith("text: tokenized on the engine's")
    assert [o.name for o in second] == names[::-1]
    assert all(o.docs_per_s > 0 and o.cpu_ms_per_doc >= 0 for o in first + second)


@pytest.mark.slow
def test_offline_steadiness_with_tokenize_adds_the_text_schedules(
    tiny_artifact: Path, tiny_data: Path, tmp_path: Path
) -> None:
    import csv

    from bench import load_offline

    argv = ["--model-dir", str(tiny_artifact), "--data", str(tiny_data), "--precision", "fp32",
            "--docs", "6", "--passes", "2", "--pause", "0", "--threads", "1", "--tokenize",
            "--out", str(tmp_path)]  # fmt: skip
    assert load_offline.main(argv) == 0
    with (tmp_path / "offline.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["pass"]) for r in rows] == [1] * 5 + [2] * 5
    # In the same order every pass, whichever order they ran in.
    assert [r["schedule"] for r in rows[:5]] == [r["schedule"] for r in rows[5:]]
    assert [r["schedule"].startswith("text: ") for r in rows[:5]] == [False] * 3 + [True] * 2
    text = (tmp_path / "offline.md").read_text()
    assert "swap places every other pass" in text and "cpu_ms_per_doc_median" in text


def test_offline_steadiness_rejects_a_pass_count_below_one(capsys: pytest.CaptureFixture) -> None:
    from bench import load_offline

    with pytest.raises(SystemExit) as stop:
        load_offline.main(["--passes", "0"])
    assert stop.value.code == 2
    assert "--passes must be 1 or more" in capsys.readouterr().err
