"""Several models in one real server process: listing, picking by name, equal scores to a process
serving each alone, and a reload under load that fails no request."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_e2e_server import Server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "model" / "artifacts" / "spamassassin-linformer"
TEXTS = [
    "Subject: Re: quarterly report\n\nHi Bob, the meeting moved to 3pm. Agenda attached.",
    "URGENT: your account wins a FREE cruise, reply with your bank details now!!!",
    "Subject: lunch\n\nAt noon?\n\nCheap meds, no prescription, limited offer, click here.",
]


def _scores(server: Server, model: str | None, endpoint: str = "/v1/classify") -> list[object]:
    body: dict[str, object] = {"input": TEXTS}
    if model is not None:
        body["model"] = model
    r = httpx.post(f"{server.url}{endpoint}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    if model is not None:
        assert answer["model"] == model
    if endpoint == "/v1/moderations":
        return [x["category_scores"] for x in answer["results"]]
    return [x["scores"] for x in answer["results"]]


@pytest.mark.skipif(not (SHIPPED / "model.onnx").exists(), reason="no shipped model here")
def test_two_models_in_one_process_score_as_each_alone(tiny_artifact: Path, tmp_path: Path) -> None:
    shipped = json.loads((SHIPPED / "config.json").read_text())["name"]
    tiny = json.loads((tiny_artifact / "config.json").read_text())["name"]
    (tmp_path / "both").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    both = Server(SHIPPED, tmp_path / "both", "--model-dir", str(tiny_artifact), "--no-jobs")
    try:
        listed = httpx.get(f"{both.url}/v1/models").json()
        assert listed["object"] == "list"
        assert {m["id"] for m in listed["data"]} == {shipped, tiny}
        assert all(m["object"] == "model" and m["owned_by"] for m in listed["data"])
        assert [m["id"] for m in listed["data"] if m["default"]] == [shipped]
        assert httpx.get(f"{both.url}/v1/models/{tiny}").json()["n_max"] == 64
        missing = httpx.post(f"{both.url}/v1/classify", json={"input": "x", "model": "nope"})
        assert missing.status_code == 404
        assert shipped in missing.json()["error"]["message"]
        assert tiny in missing.json()["error"]["message"]
        assert httpx.get(f"{both.url}/v1/models/nope").status_code == 404
        together = {
            name: (_scores(both, name), _scores(both, name, "/v1/moderations"))
            for name in (shipped, tiny)
        }
        default = _scores(both, None)
    finally:
        assert both.stop()
    assert default == together[shipped][0]
    assert together[shipped][0] != together[tiny][0]
    for name, artifact, where in ((shipped, SHIPPED, "one"), (tiny, tiny_artifact, "two")):
        alone = Server(artifact, tmp_path / where, "--no-jobs")
        try:
            assert _scores(alone, name) == together[name][0]
            assert _scores(alone, name, "/v1/moderations") == together[name][1]
        finally:
            assert alone.stop()


def test_a_replaced_artifact_is_reloaded_under_load_without_a_failed_request(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(tiny_artifact, repository / "tiny")
    name = json.loads((tiny_artifact / "config.json").read_text())["name"]
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    server = Server(
        repository / "tiny", tmp_path, "--model-repository", str(repository), "--no-jobs",
        "--api-keys-file", str(keys),
    )  # fmt: skip
    auth = {"Authorization": "Bearer k1"}
    stop = threading.Event()
    outcomes: list[tuple[int, float]] = []

    def load() -> None:
        with httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    status = client.post(
                        "/v1/classify", json={"input": TEXTS, "model": name}
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                outcomes.append((status, time.perf_counter() - began))

    try:
        assert httpx.post(f"{server.url}/admin/reload").status_code == 401
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        before = len(outcomes)
        # A new version is written beside the old one, then swapped in by renaming.
        staged = repository / ".tiny.new"
        shutil.copytree(tiny_artifact, staged)
        config = json.loads((staged / "config.json").read_text())
        config["version"] = "2.0.0"
        (staged / "config.json").write_text(json.dumps(config))
        (repository / "tiny").rename(tmp_path / "tiny.old")
        staged.rename(repository / "tiny")
        server.proc.send_signal(signal.SIGHUP)
        for _ in range(300):
            models = httpx.get(f"{server.url}/v1/models", headers=auth).json()["data"]
            if models[0]["version"] == "2.0.0":
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the new version never came in")
        swapped = len(outcomes)
        time.sleep(2)
        report = httpx.post(f"{server.url}/admin/reload", headers=auth, timeout=60).json()
        assert report["unchanged"] == [name] and not report["failed"]
    finally:
        stop.set()
        for t in threads:
            t.join()
        log = server.log
        stopped = server.stop()
    statuses = [status for status, _ in outcomes]
    failed = [s for s in statuses if s != 200]
    latencies = sorted(seconds for _, seconds in outcomes)
    print(
        f"reload under load: {len(statuses)} requests ({before} before the swap, "
        f"{swapped - before} during, {len(statuses) - swapped} after), {len(failed)} failed, "
        f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    assert not failed, failed
    assert len(statuses) - swapped > 0
    assert "old model version drained" in log.read_text()
    assert stopped
