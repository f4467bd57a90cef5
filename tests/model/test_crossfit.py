"""Out-of-fold scores for the threshold rule: folds of the training split, fold runs scoring what
they did not see, and linmod-eval holding the group rates on validation and those scores."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from model.crossfit import fold_of, main, read_held_out, write_folds
from model.data import DataError, read_split
from model.metrics import choose_threshold, threshold_rule
from tests.conftest import TINY_MODEL, TINY_TRAIN


def test_folds_partition_the_training_split_and_keep_each_groups_share(
    tiny_data: Path, tmp_path: Path
) -> None:
    train = read_split(tiny_data, "train")
    dirs = write_folds(tiny_data, tmp_path / "folds", 3)
    assert [d.name for d in dirs] == ["fold-0", "fold-1", "fold-2"]
    held: list[str] = []
    groups = Counter(e.group for e in train)
    for k, d in enumerate(dirs):
        fit = {e.id for e in read_split(d, "train")}
        out = read_split(d, "test")
        # Each fold trains on everything but its held-out documents, and holds out each group's
        # share (to within one document).
        assert fit | {e.id for e in out} == {e.id for e in train}
        assert not fit & {e.id for e in out}
        for group, n in groups.items():
            assert abs(sum(e.group == group for e in out) - n / 3) < 1
        assert (d / "validation.jsonl").read_bytes() == (
            tiny_data / "validation.jsonl"
        ).read_bytes()
        assert json.loads((d / "manifest.json").read_text())["crossfit"]["fold"] == k
        held += [e.id for e in out]
    assert sorted(held) == sorted(e.id for e in train)  # every document held out exactly once
    # The same folds whatever the order of the file.
    assert fold_of(train, 3) == fold_of(train[::-1], 3)


def test_held_out_scores_join_validation_in_holding_a_group_rate() -> None:
    # Validation: the one hard-ham message scores 0.1, so holding 5% of it changes nothing and
    # 0.3 separates best. Out of fold, two of eight hard-ham messages score 0.5 and 0.6: holding
    # 5% of the nine together moves the threshold above both.
    scores = np.array([0.05, 0.1, 0.2, 0.4, 0.7, 0.9, 0.95])
    truth = np.array([0, 0, 0, 1, 1, 1, 1])
    groups = np.array(["ham", "hard", "ham", "spam", "spam", "spam", "spam"])
    held = np.array([0.5, 0.6, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    held_groups = np.array(["hard"] * 8)
    alone = choose_threshold(scores, truth, groups, {"hard": 0.05})
    together = choose_threshold(scores, truth, groups, {"hard": 0.05}, held, held_groups)
    assert 0.2 < alone <= 0.4
    assert 0.6 < together <= 0.7
    # Only the hold sees them: documents of groups not held change nothing.
    spam_held = np.array(["spam"] * 8)
    assert choose_threshold(scores, truth, groups, {"hard": 0.05}, held, spam_held) == alone
    words = threshold_rule({"hard": 0.05}, "the training split's out-of-fold scores (3 folds)")
    assert "at most 5% of hard there and in the training split's out-of-fold scores" in words


def test_fold_runs_score_their_held_out_documents_and_eval_holds_the_rate_on_them(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.config import ModelConfig
    from model.evaluate import main as eval_main
    from model.train import TrainConfig, train

    dirs = write_folds(tiny_data, tmp_path / "folds", 2)
    files = []
    for d in dirs:
        run = tmp_path / f"run-{d.name}"
        train(d, run, ModelConfig(**TINY_MODEL), TrainConfig(**TINY_TRAIN), progress=False)
        out = tmp_path / f"{d.name}.json"
        assert main(["score", "--run", str(run), "--data", str(d), "--out", str(out)]) == 0
        record = json.loads(out.read_text())
        held = read_split(d, "test")
        assert [r["id"] for r in record["scores"]] == [e.id for e in held]
        assert all(0.0 <= r["score"] <= 1.0 for r in record["scores"])
        files.append(out)
    whole = tmp_path / "run-whole"
    train(tiny_data, whole, ModelConfig(**TINY_MODEL), TrainConfig(**TINY_TRAIN), progress=False)
    art = tmp_path / "art"
    args = ["--run", str(whole), "--data", str(tiny_data), "--artifact", str(art)]
    rate = ["--max-flag-rate", "hard-ham-1=0.05", "--no-spamassassin"]
    assert eval_main([*args, *rate, "--held-out-scores", *map(str, files)]) == 0
    metrics = json.loads((art / "metrics.json").read_text())
    n_hard = sum(e.group == "hard-ham-1" for e in read_split(tiny_data, "train"))
    assert metrics["held_out_for_threshold"]["documents"] == {"hard-ham-1": n_hard}
    assert "out-of-fold scores (2 folds)" in metrics["threshold_rule"]
    assert (
        json.loads((art / "config.json").read_text())["threshold_rule"]
        == (metrics["threshold_rule"])
    )
    # The model's threshold holds 5% of the hard ham of validation and of the folds together.
    val = read_split(tiny_data, "validation")
    from model.checkpoint import load_checkpoint
    from model.crossfit import held_arrays
    from model.tokenizer import encode, load_tokenizer
    from service.artifact import flag_scores, softmax

    model = load_checkpoint(whole / "best")
    tok = load_tokenizer(whole / "tokenizer.json")
    ids = [x[: model.cfg.n_max] for x in encode(tok, [e.text for e in val])]
    from model.batching import predict_logits

    val_s = flag_scores(softmax(predict_logits(model, ids)), model.cfg.labels, ["spam"])
    held_s, held_g = held_arrays(read_held_out(files, read_split(tiny_data, "train")))
    hard = np.concatenate(
        [val_s[[e.group == "hard-ham-1" for e in val]], held_s[held_g == "hard-ham-1"]]
    )
    assert (hard >= metrics["model"]["threshold"]).mean() <= 0.05
    card = (art / "MODEL_CARD.md").read_text()
    assert "out-of-fold scores over the same 2 folds" in card
    # Held-out scores without a rate to hold are refused, as are files that do not fit the data.
    assert eval_main([*args, "--no-spamassassin", "--held-out-scores", str(files[0])]) == 2
    assert "only serve --max-flag-rate" in capsys.readouterr().err
    assert eval_main([*args, *rate, "--held-out-scores", str(files[0]), str(files[0])]) == 2
    assert "in another fold's scores too" in capsys.readouterr().err


def test_held_out_files_that_do_not_fit_the_training_split_are_clear(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = read_split(tiny_data, "train")
    stray = tmp_path / "stray.json"
    stray.write_text(
        json.dumps(
            {
                "crossfit": {"fold": 0, "folds": 2},
                "scores": [{"id": "not-a-training-id", "group": "hard-ham-1", "score": 0.5}],
            }
        )
    )
    with pytest.raises(DataError, match="1 ids are not in the training split"):
        read_held_out([stray], train)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("[1, 2")
    with pytest.raises(DataError, match="not a `linmod-folds score` file"):
        read_held_out([garbage], train)
    # Scoring a directory that linmod-folds did not write is a clear error, not a traceback.
    code = main(["score", "--run", str(tmp_path), "--data", str(tiny_data), "--out", str(stray)])
    assert code == 2
    assert "was not written by `linmod-folds split`" in capsys.readouterr().err
    assert main(["split", "--data", str(tiny_data), "--out", str(tmp_path / "f"), "--folds", "1"])
    assert "--folds must be at least 2" in capsys.readouterr().err
