"""Training run outputs, checkpoints without pickle, evaluation, threshold rule and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.batching import collate, length_batches
from model.checkpoint import CheckpointError, load_checkpoint
from model.metrics import binary_report, choose_threshold, expected_calibration_error
from model.tokenizer import PAD_ID, load_tokenizer, train_tokenizer
from model.train import TrainConfig


def test_length_batches_respect_the_padded_token_budget_and_cover_everything() -> None:
    import random

    lengths = [random.Random(i).randint(1, 500) for i in range(300)]
    for rng in (None, random.Random(0)):
        batches = length_batches(lengths, max_tokens=2048, max_batch=16, rng=rng)
        assert sorted(i for b in batches for i in b) == list(range(300))
        for b in batches:
            assert len(b) <= 16
            assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 2048


def test_collate_right_pads_with_the_pad_id() -> None:
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_tokenizer_carries_its_normalisation(tmp_path: Path) -> None:
    tok = train_tokenizer(["Hello there, FREE money", "hello again"] * 20, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.token_to_id("<pad>") == PAD_ID
    # Runs of spaces and blank lines, and compatibility forms, normalise inside the file itself.
    same = ["FREE  money\n\n\n now", "FREE money\nnow", "ＦＲＥＥ money \n now"]
    assert len({tuple(loaded.encode(t).ids) for t in same}) == 1


@pytest.mark.slow
def test_training_run_writes_safetensors_checkpoints_and_a_history(tiny_run: Path) -> None:
    for ckpt in ("best", "last"):
        files = sorted(p.name for p in (tiny_run / ckpt).iterdir())
        assert files == ["model.safetensors", "model_config.json", "train_state.json"]
        # safetensors: an 8-byte header length then JSON, never a pickle.
        raw = (tiny_run / ckpt / "model.safetensors").read_bytes()
        assert raw[8:9] == b"{" and b"\x80\x04" not in raw[:16]
    history = json.loads((tiny_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert all(h["tokens_per_second"] > 0 and "val_auc" in h for h in history)
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["machine"]["cpu"] and run["wall_seconds"] > 0 and run["data_sha256"]
    # Best by validation ROC-AUC (ties: the first), the rule the threshold step relies on; the
    # mean of the last epochs' weights replaces it only when it validates better still.
    best = max(history, key=lambda h: h["val_auc"])
    kept = json.loads((tiny_run / "best" / "train_state.json").read_text())
    assert run["selected_by"] == "auc" and run["best_epoch"] == kept["epoch"]
    averaged = run["averaged"]
    assert averaged["epochs"] == [h["epoch"] for h in history][-TrainConfig().average_last :]
    if isinstance(kept["epoch"], int):
        assert kept["epoch"] == best["epoch"] and averaged["val"]["auc"] <= best["val_auc"]
    else:
        assert (
            kept["epoch"].startswith("average of epochs")
            and averaged["val"]["auc"] > best["val_auc"]
        )
    assert sorted(int(p.name) for p in (tiny_run / "epochs").iterdir()) == [
        h["epoch"] for h in history
    ]


def test_averaged_checkpoint_is_the_mean_of_the_weights(tmp_path: Path) -> None:
    from model.checkpoint import average_checkpoints, save_checkpoint
    from model.config import ModelConfig
    from model.linformer import LinformerClassifier

    cfg = ModelConfig(vocab_size=50, n_max=16, d_model=8, n_layers=1, n_heads=2, d_ff=8, k=4)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(LinformerClassifier(cfg))
        save_checkpoint(models[-1], tmp_path / str(seed))
    avg = average_checkpoints([tmp_path / "0", tmp_path / "1"]).state_dict()
    a, b = (m.state_dict() for m in models)
    for k in a:
        assert torch.allclose(avg[k], (a[k] + b[k]) / 2)


@pytest.mark.slow
def test_checkpoint_loads_and_bad_checkpoints_are_clear(tiny_run: Path, tmp_path: Path) -> None:
    model = load_checkpoint(tiny_run / "best")
    assert not model.training
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path)
    (tmp_path / "model_config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path)


@pytest.mark.slow
def test_same_seed_same_model(tiny_data: Path, tmp_path: Path) -> None:
    from model.config import ModelConfig
    from model.train import TrainConfig, train
    from tests.conftest import TINY_MODEL, TINY_TRAIN

    tc = TrainConfig(**{**TINY_TRAIN, "epochs": 1, "max_train_docs": 30})
    for name in ("a", "b"):
        train(tiny_data, tmp_path / name, ModelConfig(**TINY_MODEL), tc, progress=False)
    a, b = (load_checkpoint(tmp_path / n / "last").state_dict() for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_group_weights_parse_and_bad_specs_are_clear() -> None:
    from model.training import parse_group_values

    assert parse_group_values("", "weight") == {}
    assert parse_group_values("hard-ham-1=4, a=b=0.5", "weight") == {"hard-ham-1": 4.0, "a=b": 0.5}
    for bad in ("hard-ham-1", "=2", "x=0", "x=-1", "x=lots"):
        with pytest.raises(ValueError, match="group=weight"):
            parse_group_values(bad, "weight")


@pytest.mark.slow
def test_group_weights_change_training_and_weight_one_changes_nothing(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.config import ModelConfig
    from model.train import TrainConfig, main, train
    from tests.conftest import TINY_MODEL, TINY_TRAIN

    runs = {"none": "", "one": "hard-ham-1=1", "four": "hard-ham-1=4"}
    for name, spec in runs.items():
        tc = TrainConfig(**{**TINY_TRAIN, "epochs": 1, "group_weights": spec})
        train(tiny_data, tmp_path / name, ModelConfig(**TINY_MODEL), tc, progress=False)
    w = {n: load_checkpoint(tmp_path / n / "last").state_dict() for n in runs}
    assert all(torch.equal(w["none"][k], w["one"][k]) for k in w["none"])
    assert not all(torch.equal(w["none"][k], w["four"][k]) for k in w["none"])

    args = ["--data", str(tiny_data), "--out", str(tmp_path / "bad"), "--no-progress"]
    assert main([*args, "--group-weights", "no-such-group=2"]) == 2
    assert "not in the training split: ['no-such-group']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_threshold_maximises_validation_f1_and_takes_the_median_of_ties() -> None:
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    truth = np.array([0, 0, 0, 1, 1, 1])
    t = choose_threshold(scores, truth)
    assert 0.35 < t <= 0.4  # the only cut that separates the classes perfectly
    assert binary_report(scores, truth, t)["f1"] == 1.0
    # Two separating gaps in a row -> the median of the tied candidates.
    t2 = choose_threshold(np.array([0.1, 0.5, 0.9]), np.array([0, 1, 1]))
    assert t2 == pytest.approx(0.3)


def test_threshold_can_be_held_to_a_group_flag_rate() -> None:
    from model.metrics import threshold_rule

    # Unconstrained, 0.5 separates best (F1 0.86), flagging the one hard-ham message at 0.6.
    scores = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9, 0.55])
    truth = np.array([0, 0, 0, 1, 1, 1, 1])
    groups = np.array(["ham", "ham", "hard", "spam", "spam", "spam", "spam"])
    free = choose_threshold(scores, truth)
    held = choose_threshold(scores, truth, groups, {"hard": 0.0})
    assert free < 0.55 and 0.6 < held <= 0.7
    assert (
        binary_report(scores, truth, held, list(groups))["flag_rate_by_group"]["hard"]["flagged"]
        == 0
    )
    # A rate the unconstrained choice already meets changes nothing.
    assert choose_threshold(scores, truth, groups, {"hard": 1.0}) == free
    with pytest.raises(ValueError, match="no validation examples in group 'other'"):
        choose_threshold(scores, truth, groups, {"other": 0.1})
    assert "at most 5% of hard there" in threshold_rule({"hard": 0.05})


def test_flag_rate_specs_parse_and_bad_ones_are_clear(
    tiny_run: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.evaluate import main
    from model.training import parse_group_values

    assert parse_group_values("hard-ham-1=0.05,x=1", "rate") == {"hard-ham-1": 0.05, "x": 1.0}
    for bad in ("hard-ham-1", "x=1.5", "x=-0.1", "=0.1", "x=some"):
        with pytest.raises(ValueError, match="group=rate"):
            parse_group_values(bad, "rate")
    args = ["--run", str(tiny_run), "--data", str(tiny_data), "--artifact", str(tmp_path / "a")]
    assert main([*args, "--max-flag-rate", "x=2"]) == 2
    assert "rates from 0 to 1" in capsys.readouterr().err
    assert main([*args, "--max-flag-rate", "no-such-group=0.1"]) == 2
    assert "no validation examples in group 'no-such-group'" in capsys.readouterr().err


def test_calibration_error_is_zero_for_calibrated_and_large_for_overconfident() -> None:
    conf = np.full(1000, 0.7)
    correct = np.arange(1000) < 700
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(np.full(100, 0.99), np.arange(100) < 50) == pytest.approx(
        0.49
    )


def test_binary_report_counts_and_group_rates() -> None:
    r = binary_report(
        np.array([0.9, 0.8, 0.2, 0.6]), np.array([1, 0, 1, 0]), 0.5, ["s", "h", "s", "hh"]
    )
    assert r["confusion_matrix"] == {"tn": 0, "fp": 2, "fn": 1, "tp": 1}
    assert r["flag_rate_by_group"]["hh"] == {"n": 1, "flagged": 1, "rate": 1.0}


@pytest.mark.slow
def test_evaluation_ships_a_complete_artifact(tiny_artifact: Path) -> None:
    names = {p.name for p in tiny_artifact.iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "metrics.json",
        "MODEL_CARD.md",
        "model.safetensors",
        "model_config.json",
        "training.json",
        "model.onnx",
        "model.int8.onnx",
    } <= names
    cfg = json.loads((tiny_artifact / "config.json").read_text())
    assert cfg["labels"] == ["ham", "spam"] and cfg["flag_labels"] == ["spam"]
    assert cfg["n_max"] == 64 and 0 < cfg["threshold"] < 1 and cfg["data"]["sha256"]
    metrics = json.loads((tiny_artifact / "metrics.json").read_text())
    # The threshold was chosen on validation: it is the one recorded for the test report.
    assert metrics["model"]["threshold"] == pytest.approx(cfg["threshold"], abs=1e-6)
    for key in ("model", "model_chunked", "baseline_tfidf_logreg"):
        r = metrics[key]
        assert {
            "f1",
            "precision",
            "recall",
            "roc_auc",
            "calibration_error",
            "confusion_matrix",
        } <= set(r)
        assert "hard-ham-1" in r["flag_rate_by_group"]
    card = (tiny_artifact / "MODEL_CARD.md").read_text()
    for section in (
        "## Evaluation",
        "TF-IDF + logistic regression",
        "## Training",
        "## ONNX files",
        "Threshold rule",
        "Wall time",
    ):
        assert section in card
    assert "Loss weights by group" not in card  # the tiny run sets none


def test_model_card_states_group_weights_when_training_used_them(tmp_path: Path) -> None:
    from model.card import render_card

    (tmp_path / "config.json").write_text(json.dumps({"labels": ["ham", "spam"]}))
    (tmp_path / "training.json").write_text(
        json.dumps({"train_config": {"epochs": 1, "group_weights": "hard-ham-1=4"}})
    )
    assert "Loss weights by group: `hard-ham-1=4`" in render_card(tmp_path)


def test_model_card_states_a_boosted_stage_and_a_cross_fitted_teacher(tmp_path: Path) -> None:
    from model.card import render_card

    (tmp_path / "config.json").write_text(json.dumps({"labels": ["ham", "spam"]}))
    first = {"train_config": {"epochs": 2, "lr": 5e-5, "max_len": 256}, "wall_seconds": 60}
    second = {
        "train_config": {"epochs": 1, "lr": 3e-5, "max_len": 512, "bow_offset": 2.0},
        "pretraining": first,
        "distilled_from": {
            "teacher": "t/best-encoder",
            "max_len": 512,
            "bow_folds": 5,
            "bow_mix": 2.0,
            "accuracy": 0.99,
        },
    }
    (tmp_path / "training.json").write_text(json.dumps(second))
    card = render_card(tmp_path)
    assert "stage 2: documents cut to 512 tokens" in card
    assert "boosted on the bag of words (w 2.0)" in card
    assert "Boosted on the bag of words (`--bow-offset 2.0`)" in card
    assert "other 4 of 5 folds" in card
    assert "cross-fitted over 5 folds" in card and "left out" not in card
    del second["train_config"]["bow_offset"], second["distilled_from"]["bow_folds"]
    (tmp_path / "training.json").write_text(json.dumps(second))
    card = render_card(tmp_path)
    assert "Boosted" not in card and "its bag of words is left out" in card


def test_model_card_names_the_kept_epoch_and_label_smoothing(tmp_path: Path) -> None:
    from model.card import render_card

    (tmp_path / "config.json").write_text(json.dumps({"labels": ["ham", "spam"]}))
    history = [
        {"epoch": e, "train_loss_ema": 0.1, "val_loss": 0.1, "val_auc": auc, "tokens_per_second": 1}
        for e, auc in ((1, 0.91), (2, 0.97))
    ]
    training = {
        "train_config": {"epochs": 2, "average_last": 2, "label_smoothing": 0.1},
        "best_epoch": 2,
        "averaged": {"epochs": [1, 2], "val": {"auc": 0.95}},
        "history": history,
    }
    (tmp_path / "training.json").write_text(json.dumps(training))
    card = render_card(tmp_path)
    assert "**epoch 2** (validation ROC-AUC 0.9700; the average's 0.9500)." in card
    assert "Label smoothing 0.1" in card

    training["best_epoch"] = "average of epochs 1-2"
    training["train_config"]["label_smoothing"] = 0.0
    (tmp_path / "training.json").write_text(json.dumps(training))
    card = render_card(tmp_path)
    assert "**average of epochs 1-2** (the average's validation ROC-AUC: 0.9500)." in card
    assert "Label smoothing" not in card


def test_layer_wise_learning_rates_decay_from_the_head_down() -> None:
    from model.config import ModelConfig
    from model.linformer import LinformerClassifier
    from model.training import layer_depth, make_optimizer

    model = LinformerClassifier(ModelConfig(vocab_size=50, n_max=16, d_model=16, n_heads=2, k=4))
    assert layer_depth("head.weight", 4) == 0
    assert layer_depth("blocks.3.attn.q.weight", 4) == 1
    assert layer_depth("blocks.0.mlp.fc.weight", 4) == 4
    assert layer_depth("tok_emb.weight", 4) == 5
    opt = make_optimizer(model, 1e-3, 0.01, layer_lr_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.head.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.blocks[3].attn.q.weight)] == pytest.approx(5e-4)
    assert lr_of[id(model.tok_emb.weight)] == pytest.approx(1e-3 * 0.5**5)
    # Without decay: one learning rate, and the same decay split as before.
    plain = make_optimizer(model, 1e-3, 0.01)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
    assert sorted(g["weight_decay"] for g in plain.param_groups) == [0.0, 0.01]


def test_a_second_stage_starts_from_the_first_with_its_head(
    tiny_data: Path, tiny_run: Path, tmp_path: Path
) -> None:
    """A length curriculum: a run started from another run, head included, at a longer max_len."""
    from model.config import ModelConfig
    from model.train import train

    first = load_checkpoint(tiny_run / "last")
    tc = TrainConfig(
        epochs=1, schedule_epochs=3, init=str(tiny_run), init_head=True, max_len=16, lr=0.0
    )
    summary = train(tiny_data, tmp_path / "stage2", ModelConfig(), tc, progress=False)
    second = load_checkpoint(tmp_path / "stage2" / "last")
    assert summary["model_config"]["n_max"] == first.cfg.n_max
    # A zero learning rate leaves every weight, head included, as the first stage left it.
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


def test_bootstrap_interval_of_the_f1_difference_brackets_it() -> None:
    from model.metrics import bootstrap_f1_difference

    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.3
    good = np.where(truth, 0.9, 0.1) + rng.normal(0, 0.2, 400)
    worse = np.where(truth, 0.7, 0.3) + rng.normal(0, 0.3, 400)
    d = bootstrap_f1_difference(good, 0.5, worse, 0.5, truth, n=500)
    assert d["ci95_low"] < d["difference"] < d["ci95_high"]
    assert d["ci95_low"] > 0 and d["share_above_zero"] > 0.95
    same = bootstrap_f1_difference(good, 0.5, good, 0.5, truth, n=50)
    assert same["difference"] == same["ci95_low"] == same["ci95_high"] == 0.0


def test_boosting_on_a_bag_of_words_trains_and_validates_the_sum(
    tiny_data: Path, tmp_path: Path
) -> None:
    """With bow_offset, validation scores the encoder's logits plus w x the branch fitted on the
    whole training split, and training differs from a plain run of the same seed."""
    import torch.nn.functional as F

    from model.batching import predict_logits
    from model.bow import bow_logits, fit_bow
    from model.config import ModelConfig
    from model.data import read_split
    from model.tokenizer import encode
    from model.train import train
    from tests.conftest import TINY_MODEL, TINY_TRAIN

    base = {**TINY_TRAIN, "epochs": 1, "average_last": 0}
    for name, w in (("plain", 0.0), ("boosted", 0.5)):
        tc = TrainConfig(**base, bow_offset=w, bow_folds=3)
        train(tiny_data, tmp_path / name, ModelConfig(**TINY_MODEL), tc, progress=False)
    run = tmp_path / "boosted"
    model = load_checkpoint(run / "last")
    tok = load_tokenizer(run / "tokenizer.json")
    labels = model.cfg.labels
    split = {s: read_split(tiny_data, s) for s in ("train", "validation")}
    ids = {
        s: [x[: model.cfg.n_max] for x in encode(tok, [e.text for e in ex])]
        for s, ex in split.items()
    }
    y = {s: np.array([labels.index(e.label) for e in ex]) for s, ex in split.items()}
    state = fit_bow(ids["train"], y["train"], model.cfg.vocab_size, len(labels))
    logits = predict_logits(model, ids["validation"]) + 0.5 * bow_logits(state, ids["validation"])
    expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y["validation"]))
    history = json.loads((run / "history.json").read_text())
    assert history[0]["val_loss"] == pytest.approx(float(expected), abs=1e-4)
    plain, boosted = (
        load_checkpoint(tmp_path / n / "last").state_dict() for n in ("plain", "boosted")
    )
    assert not all(torch.equal(plain[k], boosted[k]) for k in plain)

    # linmod-bow installs the branch at the weight the encoder was boosted beside; a plain run's
    # weight is the grid's best on validation log loss.
    from model.bow import MIX_GRID, add_bow

    record = add_bow(run, tiny_data)
    assert record["rule"] == "the boosting weight" and record["chosen"]["mix"] == 0.5
    assert record["by_validation_log_loss"]["mix"] in MIX_GRID
    installed = load_checkpoint(run / "best").state_dict()
    np.testing.assert_allclose(installed["bow.weight"], 0.5 * state["bow.weight"], atol=1e-5)
    record = add_bow(tmp_path / "plain", tiny_data)
    assert record["rule"] == "validation log loss"
    assert record["chosen"] == record["by_validation_log_loss"]


def test_bag_of_words_group_weights_lower_the_weighted_groups_scores(
    tiny_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """Weighing a ham group in the regression pulls that group's spam logits down; linmod-bow
    records the weights and refuses a group the training split does not have."""
    import shutil

    from model.bow import add_bow, bow_logits, fit_bow
    from model.data import DataError, read_split
    from model.tokenizer import encode

    examples = read_split(tiny_data, "train")
    tok = load_tokenizer(tiny_run / "tokenizer.json")
    seqs = encode(tok, [e.text for e in examples])
    y = np.array([e.label == "spam" for e in examples]).astype(int)
    hard = np.array([e.group == "hard-ham-1" for e in examples])
    assert hard.any()
    vocab = tok.get_vocab_size()
    plain = bow_logits(fit_bow(seqs, y, vocab, 2, 1.0), seqs)
    heavy = bow_logits(fit_bow(seqs, y, vocab, 2, 1.0, np.where(hard, 8.0, 1.0)), seqs)
    margin = lambda z: (z[:, 1] - z[:, 0])[hard].mean()  # noqa: E731
    assert margin(heavy) < margin(plain)

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert add_bow(run, tiny_data, group_weights="hard-ham-1=4")["group_weights"] == "hard-ham-1=4"
    shutil.rmtree(run)
    shutil.copytree(tiny_run, run)
    with pytest.raises(DataError, match="not in the training split"):
        add_bow(run, tiny_data, group_weights="no-such-group=2")


def test_a_boosted_runs_branch_settings_come_from_its_training(tmp_path: Path) -> None:
    from model.bow import boosted_with

    assert boosted_with(tmp_path) is None
    tc = {"bow_offset": 2.0, "bow_c": 10.0, "group_weights": "hard-ham-1=4"}
    (tmp_path / "run.json").write_text(json.dumps({"train_config": tc}))
    assert boosted_with(tmp_path) == (2.0, 10.0, "")
    tc["bow_group_weights"] = True
    (tmp_path / "run.json").write_text(json.dumps({"train_config": tc}))
    assert boosted_with(tmp_path) == (2.0, 10.0, "hard-ham-1=4")
    (tmp_path / "run.json").write_text(json.dumps({"train_config": {"epochs": 1}}))
    assert boosted_with(tmp_path) is None
