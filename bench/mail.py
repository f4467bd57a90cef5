"""Raw mail against extracted text over HTTP, for every test-split message: the service's result on
the raw RFC 822 source (a message/rfc822 body) must equal its result on the text linmod-data wrote
(same extracted text, tokens and score), and spam F1 on the raw sources must match the model card.

    python -m bench.mail [--quick] [--precision auto|fp32|int8] [--url URL] [--tarball TGZ]

Requests go one at a time, so each document runs alone and the two scores can be compared exactly.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    base_parser,
    command_line,
    load_test_split,
    machine,
    markdown_table,
    out_dir,
    read_config,
    versions,
    write_csv,
    write_fragment,
)
from bench.loadgen import ServerProcess, free_port, service_command
from model.corpus import default_cache_dir, fetch_npm_tarball, read_corpus_tarball
from service.inputs import mail_limits
from service.mailtext import extract_message
from service.settings import Settings

MAIL = {"content-type": "message/rfc822"}


def card_f1(model_dir: Path) -> float:
    """The model card's spam F1 of the chunked model (what the service does by default)."""
    card = (model_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    found = re.search(r"\| Linformer \(chunked, max\) \| ([0-9.]+) \|", card)
    if found is None:
        raise SystemExit(f"no 'Linformer (chunked, max)' row in {model_dir / 'MODEL_CARD.md'}")
    return float(found.group(1))


def compare(url: str, examples: list[Any], raws: dict[str, bytes]) -> list[list[Any]]:
    """One row per message: ids, label, and both results side by side."""
    limits = mail_limits(Settings())
    rows = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i, ex in enumerate(examples):
            raw = raws[ex.id]
            extracted = extract_message(raw, limits, need_text=True).text
            as_text = client.post("/v1/classify", json={"input": ex.text})
            as_raw = client.post("/v1/classify", content=raw, headers=MAIL)
            as_text.raise_for_status()
            as_raw.raise_for_status()
            (t,) = as_text.json()["results"]
            (r,) = as_raw.json()["results"]
            rows.append([
                ex.id, ex.group, ex.label, extracted == ex.text,
                r["extraction"]["chars"] == len(ex.text), t["tokens"], r["tokens"],
                t["scores"]["spam"], r["scores"]["spam"], t["flagged"], r["flagged"],
            ])  # fmt: skip
            if (i + 1) % 200 == 0:
                print(f"  {i + 1}/{len(examples)}", file=sys.stderr)
    return rows


def f1(rows: list[list[Any]], flagged_col: int) -> tuple[float, float, int, int]:
    """Spam F1, accuracy, and hard ham flagged / hard ham, by a flagged column."""
    tp = sum(1 for r in rows if r[flagged_col] and r[2] == "spam")
    fp = sum(1 for r in rows if r[flagged_col] and r[2] != "spam")
    fn = sum(1 for r in rows if not r[flagged_col] and r[2] == "spam")
    correct = sum(1 for r in rows if r[flagged_col] == (r[2] == "spam"))
    hard = [r for r in rows if r[1] == "hard-ham-1"]
    f = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f, correct / len(rows), sum(1 for r in hard if r[flagged_col]), len(hard)


def main(argv: list[str] | None = None) -> int:
    p = base_parser("bench.mail", __doc__ or "")
    p.add_argument("--precision", default="auto", help="the server's --precision (default auto)")
    p.add_argument("--url", help="a running server instead of starting one")
    p.add_argument("--tarball", type=Path, help="the corpus tarball (default: npm cache)")
    args = p.parse_args(argv)
    out = out_dir(args)
    started = machine()
    examples = load_test_split(args.data, count=100 if args.quick else 0)
    tarball = args.tarball or fetch_npm_tarball(default_cache_dir())
    messages, _ = read_corpus_tarball(tarball)
    raws = {m.id: m.raw for m in messages}
    t0 = time.perf_counter()
    if args.url:
        rows = compare(args.url, examples, raws)
        provider = "as configured on " + args.url
    else:
        port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="bench-mail-"))
        cmd = service_command(
            args.model_dir, port, args.precision, tmp / "jobs.db", "--no-jobs",
            "--request-timeout-s", "600",  # a loaded machine must not turn into 504s
        )  # fmt: skip
        with ServerProcess(cmd, f"http://127.0.0.1:{port}", tmp / "server.log") as server:
            info = httpx.get(f"{server.url}/info", timeout=10).json()["runtime"]
            provider = f"{info['provider']} {info['precision']}"
            rows = compare(server.url, examples, raws)
    seconds = time.perf_counter() - t0

    n = len(rows)
    same_text = sum(r[3] for r in rows)
    same_chars = sum(r[4] for r in rows)
    same_tokens = sum(r[5] == r[6] for r in rows)
    same_score = sum(r[7] == r[8] for r in rows)
    same_flag = sum(r[9] == r[10] for r in rows)
    max_diff = max(abs(r[7] - r[8]) for r in rows)
    f_raw, acc_raw, hard_raw, n_hard = f1(rows, 10)
    f_text, acc_text, hard_text, _ = f1(rows, 9)
    card = card_f1(args.model_dir)
    threshold = read_config(args.model_dir)["threshold"]
    equal = markdown_table(
        ["check (raw source vs linmod-data text)", "equal", "of"],
        [
            ["extracted text (service/mailtext.py)", same_text, n],
            ["characters reported over HTTP", same_chars, n],
            ["tokens over HTTP", same_tokens, n],
            ["spam score over HTTP (exact)", same_score, n],
            ["flag decision over HTTP", same_flag, n],
        ],
    )
    quality = markdown_table(
        ["input over HTTP", "spam F1", "accuracy", "hard ham flagged"],
        [
            [
                "raw RFC 822 source (message/rfc822)",
                f"{f_raw:.4f}",
                f"{acc_raw:.4f}",
                f"{hard_raw}/{n_hard}",
            ],
            ["extracted text (JSON)", f"{f_text:.4f}", f"{acc_text:.4f}", f"{hard_text}/{n_hard}"],
            ["model card (chunked, max)", f"{card:.4f}", "", ""],
        ],
    )
    print(equal, "\n\n", quality, sep="")
    print(f"largest score difference {max_diff:.3g}; F1 raw - card {100 * (f_raw - card):+.2f} "
          f"points; {n} messages in {seconds:.0f} s", file=sys.stderr)  # fmt: skip
    write_csv(
        out / "mail.csv",
        ["id", "group", "label", "same_text", "same_chars", "tokens_text", "tokens_raw",
         "score_text", "score_raw", "flagged_text", "flagged_raw"],
        rows,
    )  # fmt: skip
    facts = {
        "Messages": f"{n} (test split)",
        "Server": f"linmod-serve, {provider}, threshold {threshold}",
        "Largest |score difference|": f"{max_diff:.3g}",
        "Spam F1 on raw sources minus the model card's": f"{100 * (f_raw - card):+.2f} points",
        "Versions": versions("onnxruntime", "tokenizers", "bs4", "lxml"),
        "Wall time": f"{seconds:.0f} s",
    }
    fragment = write_fragment(
        out, "mail", "Raw mail against extracted text over HTTP",
        command_line("bench.mail", argv if argv is not None else sys.argv[1:]),
        facts, equal + "\n\n" + quality, args.quick, started,
    )  # fmt: skip
    print(f"wrote {fragment}", file=sys.stderr)
    identical = same_text == same_chars == same_tokens == same_score == same_flag == n
    return 0 if identical and abs(f_raw - card) <= 0.005 else 1


if __name__ == "__main__":
    sys.exit(main())
