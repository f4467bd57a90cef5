"""linmod-mail: tagging, mailbox reading, verdicts and exit codes, and Debian's procmail delivering
an mbox into spam and ham folders through it against a real linmod-serve."""

from __future__ import annotations

import mailbox
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_testing import free_port, wait_server_ready

from model.corpus import read_corpus_tarball
from service.mailcli import MailClassifier, Verdict, read_messages, tag_message
from tests.conftest import SAMPLE_TARBALL

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "model" / "artifacts" / "spamassassin-linformer"
RAW = b"From a@b Mon Jul 22 18:14:03 2002\nSubject: hi\nTo: x@y\n\nbody\nFrom here on\n"


def test_tagging_puts_our_headers_on_top_and_drops_a_senders_own() -> None:
    tagged = tag_message(RAW, Verdict(True, 0.98765, {}))
    assert tagged == (
        b"From a@b Mon Jul 22 18:14:03 2002\nX-Linmod-Flag: YES\nX-Linmod-Score: 0.9877\n"
        b"Subject: hi\nTo: x@y\n\nbody\nFrom here on\n"
    )
    spoofed = b"Subject: s\r\nx-linmod-flag: NO\r\n  folded\r\nX-Linmod-Score: 0\r\n\r\nX-Linmod-Flag: body\r\n"
    assert tag_message(spoofed, Verdict(False, 0.1, {})) == (
        b"X-Linmod-Flag: NO\r\nX-Linmod-Score: 0.1000\r\nSubject: s\r\n\r\nX-Linmod-Flag: body\r\n"
    )
    headless = tag_message(b"just text\n", Verdict(False, 0.2, {}))
    assert headless == b"X-Linmod-Flag: NO\nX-Linmod-Score: 0.2000\n\njust text\n"


def test_messages_are_read_from_stdin_a_file_an_mbox_or_a_maildir(tmp_path: Path) -> None:
    import io

    assert list(read_messages(None, False, io.BytesIO(RAW))) == [("-", RAW)]
    (tmp_path / "one.eml").write_bytes(RAW)
    assert list(read_messages(str(tmp_path / "one.eml"), False, io.BytesIO())) == [
        (str(tmp_path / "one.eml"), RAW)
    ]
    box = mailbox.mbox(tmp_path / "in.mbox")
    box.add(RAW)
    box.add(b"Subject: two\n\nsecond\n")
    box.flush()
    got = list(read_messages(str(tmp_path / "in.mbox"), True, io.BytesIO()))
    assert [name for name, _ in got] == ["#1", "#2"]
    assert got[0][1].startswith(b"Subject: hi") and got[1][1].endswith(b"second\n")
    maildir = mailbox.Maildir(tmp_path / "md")
    key = maildir.add(b"Subject: m\n\nin a maildir\n")
    assert list(read_messages(str(tmp_path / "md"), True, io.BytesIO())) == [
        (key, b"Subject: m\n\nin a maildir\n")
    ]


async def test_a_verdict_is_the_services_answer_on_the_raw_message(
    fake_client: httpx.AsyncClient,
) -> None:
    raw = b"Subject: Win a prize\n\nclick here to claim your reward\n"
    verdict = await MailClassifier(fake_client, None).classify(raw)
    direct = await fake_client.post(
        "/v1/classify", content=raw, headers={"content-type": "message/rfc822"}
    )
    (result,) = direct.json()["results"]
    assert verdict.result == result
    assert verdict.flagged == result["flagged"] and verdict.score == result["scores"]["spam"]


def _linmod_mail() -> list[str]:
    script = Path(sys.executable).parent / "linmod-mail"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.mailcli"]


def _sample(groups: tuple[str, ...], n: int) -> list[bytes]:
    messages, _ = read_corpus_tarball(SAMPLE_TARBALL)
    return [m.raw for g in groups for m in [m for m in messages if m.group == g][:n]]


needs_model = pytest.mark.skipif(
    not (SHIPPED / "model.onnx").exists(), reason="the shipped model is not in this checkout"
)


@pytest.mark.slow
@needs_model
def test_exit_status_is_the_verdict_or_why_there_is_none(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
    local = [*_linmod_mail(), "--model-dir", str(SHIPPED)]
    box = mailbox.mbox(tmp_path / "in.mbox")
    for raw in _sample(("spam-2", "easy-ham-1"), 2):
        box.add(raw)
    box.flush()
    each = subprocess.run(
        [*local, "--each", str(tmp_path / "in.mbox")], capture_output=True, env=env
    )
    rows = [line.split("\t") for line in each.stdout.decode().splitlines()]
    assert [r[0] for r in rows] == ["#1", "#2", "#3", "#4"], each.stderr.decode()
    verdicts = {r[1] for r in rows}
    assert each.returncode == (1 if "flagged" in verdicts else 0)
    for row, raw in zip(rows, [box.get_bytes(k) for k in box.iterkeys()], strict=True):
        one = subprocess.run(local, input=raw, capture_output=True, env=env)
        assert one.returncode == (1 if row[1] == "flagged" else 0), one.stderr.decode()
        assert one.stdout.decode().strip().split("\t")[1:] == row[1:]

    binary = bytes(range(256)) * 4
    refused = subprocess.run(local, input=binary, capture_output=True, env=env)
    assert refused.returncode == 3 and b"binary data" in refused.stderr
    kept = subprocess.run([*local, "--header"], input=binary, capture_output=True, env=env)
    assert kept.returncode == 3 and kept.stdout == binary  # a filter hands the original back
    gone = [*_linmod_mail(), "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "5"]
    unavailable = subprocess.run(gone, input=RAW, capture_output=True, env=env)
    assert unavailable.returncode == 75 and b"cannot be reached" in unavailable.stderr
    missing = subprocess.run([*local, str(tmp_path / "nope.eml")], capture_output=True, env=env)
    assert missing.returncode == 2


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real linmod-serve of the shipped model on a free port."""
    tmp = tmp_path_factory.mktemp("mail-server")
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
    cmd = [
        sys.executable, "-m", "service.cli", "--model-dir", str(SHIPPED), "--host", "127.0.0.1",
        "--port", url.rsplit(":", 1)[1], "--device", "cpu", "--no-jobs", "--log-format", "text",
    ]  # fmt: skip
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        wait_server_ready(proc, url, log, timeout=120)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@needs_model
@pytest.mark.skipif(
    shutil.which("procmail") is None or shutil.which("formail") is None,
    reason="Debian's procmail (procmail and formail) is not installed",
)
def test_procmail_delivers_an_mbox_into_spam_and_ham_by_linmod_mail(
    shipped_server: str, tmp_path: Path
) -> None:
    raws = _sample(("spam-2", "spam-1", "easy-ham-1", "hard-ham-1"), 2)
    box = mailbox.mbox(tmp_path / "in.mbox")
    for raw in raws:
        box.add(raw)
    box.flush()
    mail = tmp_path / "Mail"
    mail.mkdir()
    command = " ".join([*_linmod_mail(), "--header", "--url", shipped_server])
    rc = tmp_path / "procmailrc"
    rc.write_text(
        f"SHELL=/bin/sh\nMAILDIR={mail}\nLOGFILE={tmp_path / 'procmail.log'}\n\n"
        f":0 fw\n| {command}\n\n"
        ":0\n* ^X-Linmod-Flag: YES\nspam/\n\n"
        ":0\nham/\n"
    )
    rc.chmod(0o644)
    with (tmp_path / "in.mbox").open("rb") as mbox:
        subprocess.run(["formail", "-s", "procmail", "-m", str(rc)], stdin=mbox, check=True)

    expected = {}
    for raw in raws:
        answer = httpx.post(
            f"{shipped_server}/v1/classify", content=raw,
            headers={"content-type": "message/rfc822"}, timeout=30,
        )  # fmt: skip
        (result,) = answer.json()["results"]
        subject = raw.split(b"\nSubject: ", 1)[1].split(b"\n", 1)[0].decode("latin-1")
        expected[subject] = ("spam" if result["flagged"] else "ham", result["scores"]["spam"])
    delivered = {}
    for folder in ("spam", "ham"):
        for message in mailbox.Maildir(mail / folder, factory=None, create=False):
            subject = str(message["Subject"])
            delivered[subject] = (folder, float(message["X-Linmod-Score"]))
            assert message["X-Linmod-Flag"] == ("YES" if folder == "spam" else "NO")
    assert set(delivered) == set(expected), (tmp_path / "procmail.log").read_text()
    for subject, (folder, score) in delivered.items():
        assert folder == expected[subject][0]
        assert score == pytest.approx(expected[subject][1], abs=5e-5)
    assert {folder for folder, _ in delivered.values()} == {"spam", "ham"}
