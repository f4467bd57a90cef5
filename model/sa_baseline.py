"""The SpamAssassin baseline: the installed rules plus Bayes trained with `sa-learn` on the train
split (a private, temporary database), local tests only, threshold chosen like the model's.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.header import Header
from pathlib import Path
from typing import Any

import numpy as np

from model.crossfit import held_out_words
from model.data import DataError, Example, read_split
from model.metrics import binary_report, choose_threshold, threshold_rule

DEFAULT_THRESHOLD = 5.0  # SpamAssassin's own required_score
CACHE_DIR = Path(".cache/spamassassin")
# Part of the cache key: change it when the messages or the settings below change.
METHOD = "subject+body text/plain utf-8, neutral headers; local tests; sa-learn bayes; v2"

# One long-running scorer per worker: SpamAssassin's own Perl API (what spamd runs), loaded once,
# so each message costs a rule run and not a start-up. Prints "index<TAB>score<TAB>rules hit".
_SCORER = r"""
use strict; use warnings;
use Mail::SpamAssassin;
my ($cf_file, $list) = @ARGV;
open my $cfh, '<', $cf_file or die "$cf_file: $!";
my $cf = do { local $/; <$cfh> };
my $sa = Mail::SpamAssassin->new({
    local_tests_only => 1, dont_copy_prefs => 1, post_config_text => $cf,
});
$sa->compile_now(0);
open my $lh, '<', $list or die "$list: $!";
$| = 1;
while (my $line = <$lh>) {
    chomp $line;
    my ($i, $path) = split /\t/, $line, 2;
    open my $fh, '<:raw', $path or die "$path: $!";
    my $raw = do { local $/; <$fh> };
    close $fh;
    my $msg = $sa->parse($raw, 1);
    my $st = $sa->check($msg);
    printf "%s\t%.3f\t%s\n", $i, $st->get_score(), $st->get_names_of_tests_hit();
    $st->finish; $msg->finish;
}
"""


class SpamAssassinError(Exception):
    """SpamAssassin failed while learning or scoring."""


def missing_reason() -> str | None:
    """Why the baseline cannot run here (None when it can)."""
    for tool in ("sa-learn", "spamassassin", "perl"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install spamassassin)"
    return None


@contextlib.contextmanager
def _account_state_dir_kept() -> Iterator[None]:
    """SpamAssassin creates ~/.spamassassin of the account (from the password database, not
    $HOME) even when HOME points elsewhere; an empty one it created is removed afterwards, so
    a run leaves the user's SpamAssassin directory as it found it."""
    state = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".spamassassin"
    existed = state.exists()
    try:
        yield
    finally:
        if not existed and state.is_dir() and not any(state.iterdir()):
            state.rmdir()


def sa_version() -> str:
    """The installed SpamAssassin's version, e.g. '4.0.1'."""
    # Through Perl: the `spamassassin` command would create ~/.spamassassin just to say it.
    cmd = ["perl", "-MMail::SpamAssassin", "-e", "print Mail::SpamAssassin::Version()"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SpamAssassinError(f"Perl cannot load Mail::SpamAssassin: {r.stderr.strip()}")
    return r.stdout.strip()


def to_message(text: str) -> bytes:
    """Model text (Subject line, blank line, body) as a minimal UTF-8 RFC 822 message.

    From, To, Date and Message-ID are the same neutral values for every message (the Message-ID
    unique per text, as sa-learn tells messages apart by it): without them each message carries
    about 5 points of missing-header rules, which would make SpamAssassin's default threshold
    meaningless. No routing headers, as for the model.
    """
    head, sep, body = text.partition("\n\n")
    subject = head if sep and "\n" not in head else ""
    if not subject:
        body = text
    if subject and not subject.isascii():
        subject = Header(subject, "utf-8").encode()
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    headers = (
        f"Subject: {subject}\n"
        "From: sender@example.com\n"
        "To: recipient@example.com\n"
        "Date: Thu, 01 Aug 2002 12:00:00 +0000\n"
        f"Message-ID: <{digest}@example.com>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
    )
    return (headers + "\n" + body.rstrip("\n") + "\n").encode("utf-8", "surrogatepass")


def data_key(
    splits: dict[str, list[Example]], flag_labels: list[str], version: str, extra_cf: list[str]
) -> str:
    """sha256 of the three splits, the flag labels, SpamAssassin's version and the settings."""
    h = hashlib.sha256(json.dumps([version, METHOD, sorted(flag_labels), extra_cf]).encode())
    for name in ("train", "validation", "test"):
        for e in splits[name]:
            h.update(json.dumps([name, e.id, e.text, e.label]).encode())
    return h.hexdigest()


def _write(root: Path, examples: list[Example]) -> list[Path]:
    root.mkdir(parents=True)
    paths = [root / f"{i:06d}.eml" for i in range(len(examples))]
    for p, e in zip(paths, examples, strict=True):
        p.write_bytes(to_message(e.text))
    return paths


def _run(cmd: list[str], env: dict[str, str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SpamAssassinError(f"{' '.join(cmd[:3])} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def train_bayes(
    work: Path, train: list[Example], flag_labels: list[str], env: dict[str, str], cf: list[str]
) -> dict[str, int]:
    """`sa-learn` the train split into the private database; its spam and ham counts."""
    spam = [e for e in train if e.label in flag_labels]
    ham = [e for e in train if e.label not in flag_labels]
    base = ["sa-learn", "-L", "--max-size", "0", *(f"--cf={c}" for c in cf)]
    for kind, exs in (("spam", spam), ("ham", ham)):
        _write(work / "learn" / kind, exs)
        _run([*base, "--no-sync", f"--{kind}", str(work / "learn" / kind)], env)
    _run([*base, "--sync"], env)
    magic = _run([*base, "--dump", "magic"], env)
    counts = {}
    for (
        line
    ) in magic.splitlines():  # "0.000          0        338          0  non-token data: nspam"
        parts = line.split()
        if parts[-2:-1] == ["data:"] and parts[-1] in ("nspam", "nham"):
            counts[parts[-1]] = int(parts[2])
    return counts


def score(
    work: Path, examples: list[Example], env: dict[str, str], cf_file: Path, workers: int
) -> tuple[np.ndarray, list[list[str]]]:
    """SpamAssassin's score and rules hit for each example, by `workers` scorers in parallel."""
    paths = _write(work, examples)
    (work / "scorer.pl").write_text(_SCORER)
    lists = []
    for w in range(workers):
        lst = work / f"worker{w}.txt"
        lst.write_text("".join(f"{i}\t{paths[i]}\n" for i in range(w, len(paths), workers)))
        lists.append(lst)

    def one(lst: Path) -> str:
        return _run(["perl", str(work / "scorer.pl"), str(cf_file), str(lst)], env)

    scores = np.full(len(examples), np.nan)
    rules: list[list[str]] = [[] for _ in examples]
    with ThreadPoolExecutor(workers) as pool:
        for out in pool.map(one, lists):
            for line in out.splitlines():
                i, s, hit = line.split("\t")
                scores[int(i)] = float(s)
                rules[int(i)] = hit.split(",") if hit else []
    if np.isnan(scores).any():
        raise SpamAssassinError(f"{int(np.isnan(scores).sum())} messages were not scored")
    return scores, rules


def spamassassin_scores(
    splits: dict[str, list[Example]],
    flag_labels: list[str],
    cache_dir: Path | None = None,
    workers: int | None = None,
    extra_cf: list[str] | None = None,
) -> dict[str, Any]:
    """Learn on train, score validation and test: {version, bayes, seconds, scores, rules hit}.

    `extra_cf`: more configuration lines (for tests). Cached as `<cache_dir>/<sha256 of data,
    version and settings>.json` when cache_dir is given.
    """
    extra_cf = list(extra_cf or [])
    version = sa_version()
    key = data_key(splits, flag_labels, version, extra_cf)
    cached = cache_dir / f"{key}.json" if cache_dir else None
    if cached and cached.exists():
        return {**json.loads(cached.read_text()), "cached": True}
    t0 = time.time()
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="linmod-sa-") as tmp, _account_state_dir_kept():
        work = Path(tmp)
        (work / "home").mkdir()
        # Never the user's or the system's Bayes database, and nothing learnt while scoring.
        cf = [
            "use_bayes 1",
            "bayes_auto_learn 0",
            f"bayes_path {work / 'bayes' / 'bayes'}",
            *extra_cf,
        ]
        cf_file = work / "settings.cf"
        cf_file.write_text("\n".join(cf) + "\n")
        env = {**os.environ, "HOME": str(work / "home"), "LC_ALL": "C.UTF-8"}
        bayes = train_bayes(work, splits["train"], flag_labels, env, cf)
        result: dict[str, Any] = {
            "version": version,
            "key": key,
            "bayes": {**bayes, "learned_from": "train"},
            "scores": {},
            "bayes_rule_hit_rate": {},
        }
        for name in ("validation", "test"):
            s, rules = score(work / name, splits[name], env, cf_file, workers)
            result["scores"][name] = [float(x) for x in s]
            hit = [any(r.startswith("BAYES_") for r in rs) for rs in rules]
            result["bayes_rule_hit_rate"][name] = float(np.mean(hit)) if hit else 0.0
    result["seconds"] = round(time.time() - t0, 1)
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result) + "\n")
    return {**result, "cached": False}


def spamassassin_baseline(
    splits: dict[str, list[Example]],
    flag_labels: list[str],
    max_group_rate: dict[str, float] | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
    extra_cf: list[str] | None = None,
    held_out: list[list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The test report at the validation-chosen score threshold, or {"skipped": why}.

    With `held_out` (the model's folds, `linmod-folds score` rows), the group rates are held on
    validation and on SpamAssassin's own out-of-fold scores of the training documents of those
    groups: Bayes learnt afresh on the other folds for each.
    """
    reason = missing_reason()
    if reason:
        return {"skipped": reason}
    r = spamassassin_scores(splits, flag_labels, cache_dir, workers, extra_cf)
    truth = {s: np.array([e.label in flag_labels for e in splits[s]]) for s in r["scores"]}
    scores = {s: np.array(v) for s, v in r["scores"].items()}
    val_groups = np.array([e.group for e in splits["validation"]])
    groups = [e.group for e in splits["test"]]
    held_s: list[float] = []
    held_g: list[str] = []
    by_id = {e.id: e for e in splits["train"]}
    for rows in held_out or []:
        ids = {row["id"] for row in rows}
        held = [by_id[row["id"]] for row in rows if row["group"] in (max_group_rate or {})]
        if not held:
            continue
        rest = [e for e in splits["train"] if e.id not in ids]
        fold = {"train": rest, "validation": held, "test": []}
        f = spamassassin_scores(fold, flag_labels, cache_dir, workers, extra_cf)
        held_s.extend(f["scores"]["validation"])
        held_g.extend(e.group for e in held)
    t = choose_threshold(
        scores["validation"],
        truth["validation"],
        val_groups,
        max_group_rate,
        np.array(held_s) if held_s else None,
        np.array(held_g) if held_g else None,
    )
    report = binary_report(scores["test"], truth["test"], t, groups)
    default = binary_report(scores["test"], truth["test"], DEFAULT_THRESHOLD, groups)
    # Scores are rule points, not probabilities: a calibration error means nothing here.
    report["calibration_error"] = default["calibration_error"] = None
    return {
        **report,
        "spamassassin_version": r["version"],
        "setup": "the installed rules plus Bayes trained with sa-learn on the train split "
        "(private database, no auto-learn), local tests only, messages of Subject + body "
        "with neutral From, To, Date and Message-ID headers",
        "bayes_trained_on": r["bayes"],
        "bayes_rule_hit_rate": r["bayes_rule_hit_rate"],
        "threshold_rule": threshold_rule(max_group_rate, held_out_words(held_out or [])),
        "at_default_threshold": default,
        "data_key": r["key"],
        "seconds": r["seconds"],
    }


def add_to_artifact(artifact_dir: Path, baseline: dict[str, Any]) -> None:
    """Record the baseline in an artifact's metrics.json and re-render its card."""
    from model.card import write_card

    path = artifact_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["baseline_spamassassin"] = baseline
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(artifact_dir)


def summary(r: dict[str, Any]) -> str:
    """One line for a terminal: the figures the card shows, or why it was skipped."""
    if "skipped" in r:
        return f"SpamAssassin baseline skipped: {r['skipped']}"
    hard = r["flag_rate_by_group"].get("hard-ham-1")
    d = r["at_default_threshold"]
    return (
        f"SpamAssassin {r['spamassassin_version']}: F1 {r['f1']:.4f}  precision "
        f"{r['precision']:.4f}  recall {r['recall']:.4f}  AUC {r['roc_auc']:.4f}  threshold "
        f"{r['threshold']:.2f}"
        + (f"  hard ham flagged {hard['flagged']}/{hard['n']}" if hard else "")
        + f"  (at 5.0: F1 {d['f1']:.4f})"
    )


def main(argv: list[str] | None = None) -> int:
    from model.training import parse_group_values

    p = argparse.ArgumentParser(prog="python -m model.sa_baseline", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="dataset directory (linmod-data)")
    p.add_argument("--flag-labels", nargs="+", help="default: the artifact's, or spam")
    p.add_argument("--max-flag-rate", default="", metavar="GROUP=RATE,...")
    p.add_argument("--out", type=Path, help="write the report here as JSON")
    p.add_argument(
        "--artifact", type=Path, help="also add it to this artifact's metrics.json and card"
    )
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--workers", type=int, help="parallel scorers (default: cores, at most 4)")
    args = p.parse_args(argv)
    try:
        rates = parse_group_values(args.max_flag_rate, "rate")
        flag_labels = args.flag_labels or ["spam"]
        if args.artifact:
            # The baseline must be held to the rule the artifact's model was held to.
            metrics = json.loads((args.artifact / "metrics.json").read_text())
            rule = metrics["threshold_rule"]
            flag_labels = args.flag_labels or metrics["flag_labels"]
            if rule != threshold_rule(rates):
                raise ValueError(
                    f"--max-flag-rate gives the rule {threshold_rule(rates)!r}, but the "
                    f"artifact's threshold was chosen by {rule!r}"
                )
        splits = {s: read_split(args.data, s) for s in ("train", "validation", "test")}
        r = spamassassin_baseline(splits, flag_labels, rates, args.cache_dir, args.workers)
    except (DataError, FileNotFoundError, ValueError, SpamAssassinError) as e:
        print(f"sa_baseline: error: {e}", file=sys.stderr)
        return 2
    print(summary(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2) + "\n")
    if args.artifact:
        add_to_artifact(args.artifact, r)
        print(f"updated {args.artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
