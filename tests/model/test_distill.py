"""Distillation: a teacher's logits over a split, and a student trained on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.batching import predict_logits
from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.data import DataError, read_split
from model.distill import main as distill_main
from model.distill import teacher_logits
from model.tokenizer import encode, load_tokenizer
from model.train import TrainConfig, load_pretrained, train

SHIPPED = Path(__file__).parents[2] / "model" / "artifacts" / "spamassassin-linformer"


def test_teacher_logits_cover_the_split_and_are_the_checkpoints_own(
    tiny_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "teacher.json"
    assert (
        distill_main(["--teacher", str(tiny_run), "--data", str(tiny_data), "--out", str(out)]) == 0
    )
    record = json.loads(out.read_text())
    examples = read_split(tiny_data, "train")
    assert set(record["logits"]) == {e.id for e in examples}
    model = load_checkpoint(tiny_run / "best")
    tok = load_tokenizer(tiny_run / "tokenizer.json")
    seqs = [s[: model.cfg.n_max] for s in encode(tok, [e.text for e in examples[:5]])]
    expected = predict_logits(model, seqs)
    got = np.array([record["logits"][e.id] for e in examples[:5]])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_cross_fitted_bag_of_words_scores_each_document_from_the_other_folds(
    tiny_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """--bow-folds adds, to the encoder's logits, mix x the logits of a branch fitted without the
    document: not the in-sample branch, which is sure of every training answer."""
    import shutil

    from model.bow import add_bow, bow_logits, fit_bow
    from model.distill import cross_fitted_bow

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    mix = add_bow(run, tiny_data)["chosen"]["mix"]
    plain = teacher_logits(run, tiny_data)
    crossed = teacher_logits(run, tiny_data, bow_folds=3)
    assert crossed["bow_mix"] == mix
    examples = read_split(tiny_data, "train")
    model = load_checkpoint(run / "best-encoder")
    seqs = [
        s[: model.cfg.n_max]
        for s in encode(load_tokenizer(run / "tokenizer.json"), [e.text for e in examples])
    ]
    y = np.array([["ham", "spam"].index(e.label) for e in examples])
    added = np.array(
        [np.subtract(crossed["logits"][e.id], plain["logits"][e.id]) for e in examples]
    )
    summary = json.loads((run / "run.json").read_text())
    oof, _ = cross_fitted_bow(summary, seqs, y, model.cfg.vocab_size, 2, 3)
    np.testing.assert_allclose(added, oof, atol=1e-3)
    # Held-out scores are less sure of the labels than the branch fitted on every document.
    inside = mix * bow_logits(fit_bow(seqs, y, model.cfg.vocab_size, 2), seqs)
    margin = lambda z: np.mean((z[:, 1] - z[:, 0]) * np.where(y == 1, 1, -1))  # noqa: E731
    assert margin(oof) < margin(inside)
    out = tmp_path / "t.json"
    args = ["--teacher", str(run), "--data", str(tiny_data), "--out", str(out), "--bow-folds", "1"]
    with pytest.raises(SystemExit):
        distill_main(args)


def test_an_exported_teacher_gives_its_runs_logits_without_its_bag_of_words(
    tiny_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """--teacher ARTIFACT reads the fp32 graph up to the encoder's logits, before the in-graph
    bag of words is added, and cross-fits that bag of words as the run would: a student can be
    distilled again from a clone, with no PyTorch run of the teacher."""
    import shutil

    from export.onnx_export import export_artifact
    from model.bow import add_bow
    from model.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    add_bow(run, tiny_data)
    artifact = tmp_path / "artifact"
    evaluate(run, tiny_data, artifact, "tiny-with-bow")
    export_artifact(artifact, calibration_data=tiny_data)
    assert json.loads((artifact / "model_config.json").read_text())["bow"]
    for folds in (0, 3):
        from_run = teacher_logits(run, tiny_data, bow_folds=folds)
        from_onnx = teacher_logits(artifact, tiny_data, bow_folds=folds)
        ids = sorted(from_run["logits"])
        assert ids == sorted(from_onnx["logits"])
        np.testing.assert_allclose(
            [from_onnx["logits"][i] for i in ids], [from_run["logits"][i] for i in ids], atol=1e-4
        )
        assert from_onnx["bow_mix"] == from_run["bow_mix"]
        assert from_onnx["teacher"].endswith("model.onnx")
    # The in-graph branch is left out: the artifact's own output differs from what it taught.
    import onnxruntime as ort

    from service.artifact import pad_batch

    examples = read_split(tiny_data, "train")[:4]
    tok = load_tokenizer(artifact / "tokenizer.json")
    seqs = [s[:64] for s in encode(tok, [e.text for e in examples])]
    ids, mask = pad_batch(seqs, 0)
    sess = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    (whole,) = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    plain = teacher_logits(artifact, tiny_data)
    taught = np.array([plain["logits"][e.id] for e in examples])
    assert np.abs(whole - taught).max() > 1e-2


def test_a_teacher_file_missing_documents_is_a_clear_error(
    tiny_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    record = teacher_logits(tiny_run, tiny_data)
    first = next(iter(record["logits"]))
    del record["logits"][first]
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(record))
    tc = TrainConfig(epochs=1, teacher=str(path), vocab_size=600)
    with pytest.raises(DataError, match="no logits for 1 documents"):
        train(tiny_data, tmp_path / "run", ModelConfig(n_max=64, d_model=32), tc, progress=False)


@pytest.mark.slow
def test_a_student_follows_its_teacher_where_the_teacher_disagrees_with_the_labels(
    tiny_data: Path, tmp_path: Path
) -> None:
    """A teacher that says the opposite of every label: with the distillation weight at 1 the
    student learns the teacher's answers; at 0, the labels'."""
    from tests.conftest import TINY_MODEL, TINY_TRAIN

    examples = read_split(tiny_data, "train")
    labels = ["ham", "spam"]
    flipped = {e.id: ([-4.0, 4.0] if e.label == "ham" else [4.0, -4.0]) for e in examples}
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({"labels": labels, "logits": flipped}))
    agree = {}
    for weight in (0.0, 1.0):
        run = tmp_path / f"w{weight}"
        tc = TrainConfig(
            **{**TINY_TRAIN, "average_last": 0},
            teacher=str(path),
            distill_weight=weight,
            distill_temperature=1.0,
        )
        train(tiny_data, run, ModelConfig(**TINY_MODEL), tc, progress=False)
        model = load_checkpoint(run / "last")
        tok = load_tokenizer(run / "tokenizer.json")
        seqs = [s[: model.cfg.n_max] for s in encode(tok, [e.text for e in examples])]
        pred = predict_logits(model, seqs).argmax(-1)
        y = np.array([labels.index(e.label) for e in examples])
        agree[weight] = float((pred == y).mean())
    assert agree[0.0] > 0.8, agree
    assert agree[1.0] < 0.2, agree


def test_a_student_can_start_from_a_shipped_artifact_without_its_bag_of_words() -> None:
    mc, state = load_pretrained(SHIPPED, ModelConfig(dropout=0.1), head=True)
    shipped = json.loads((SHIPPED / "model_config.json").read_text())
    assert shipped["bow"] and not mc.bow
    assert mc.d_model == shipped["d_model"] and mc.n_max == shipped["n_max"]
    assert state and not any(k.startswith("bow.") for k in state)
    assert any(k.startswith("head.") for k in state)
