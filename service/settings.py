"""Service settings: one pydantic-settings model, read from LINMOD_* variables and CLI flags."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.costmodel import BatchingMode

Device = Literal["auto", "cuda", "cpu"]
Precision = Literal["auto", "fp32", "fp16", "int8"]
LongDocumentPolicy = Literal["chunk", "truncate", "reject"]
Aggregation = Literal["max", "mean"]


class Settings(BaseSettings):
    """Every field is also the `linmod-serve --kebab-case-name` flag and `LINMOD_UPPER_NAME`."""

    model_config = SettingsConfigDict(
        env_prefix="LINMOD_", extra="forbid", protected_namespaces=(), validate_default=True
    )

    # Model and runtime
    model_dir: Path = Field(
        Path("model/artifacts/spamassassin-linformer-distilled"),
        description="directory with config.json, tokenizer.json and model*.onnx",
    )
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="more artifact directories to serve beside model_dir (comma-separated; "
        "--model-dir may also be repeated)",
    )
    model_repository: Path | None = Field(
        None,
        description="a directory with one artifact per sub-folder, all served; SIGHUP or POST "
        "/admin/reload picks up added or replaced folders",
    )
    default_model: str | None = Field(
        None, description="the model a request without a model field gets (default: the first)"
    )
    served_model_name: str | None = Field(
        None, description="model name reported in responses (default: config name)"
    )
    device: Device = Field("auto", description="auto tries CUDA then CPU; cuda fails without it")
    precision: Precision = Field(
        "auto", description="auto: fp16 on CUDA, int8 on CPU, when those files exist; else fp32"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: auto)")
    inter_op_threads: int = Field(0, ge=0, description="ONNX Runtime inter-op threads (0: auto)")
    engine_workers: int = Field(
        0,
        ge=0,
        description="engine runs at once, each in its own thread (0: on CPU one per core, each "
        "with one intra-op thread; on CUDA one)",
    )
    ort_allow_spinning: bool = Field(
        False, description="let ONNX Runtime's intra-op threads spin between runs (burns CPU)"
    )
    tokenizer_threads: int = Field(2, ge=1, description="threads that tokenize requests")
    inline_tokenize_chars: int = Field(
        4096,
        ge=0,
        description="on an idle server, requests of at most this many characters are tokenized "
        "on the event loop (quicker than the thread hops); others in the tokenizer threads",
    )
    inline_run_ms: float = Field(
        20.0,
        ge=0,
        description="on an idle server, a lone window predicted to run within this many ms runs "
        "on the event loop (quicker than the thread hops; the loop waits for it); 0: never",
    )
    warmup: bool = Field(True, description="run representative shapes before /ready turns 200")

    # Batching
    max_batch_tokens: int = Field(
        16384, ge=1, description="padded tokens per engine run (batch size x longest window)"
    )
    max_batch_size: int = Field(32, ge=1, description="windows per engine run")
    batching: BatchingMode = Field(
        "auto",
        description="auto: time the engine over batch shapes at warm-up and batch only where it "
        "pays; on; off: one window per run",
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="how long a partial batch waits for more while requests are being tokenized "
        "(never when none are)",
    )
    max_queue_items: int = Field(1024, ge=1, description="interactive windows waiting, at most")
    max_queue_tokens: int = Field(
        1_048_576, ge=1, description="interactive tokens waiting, at most (then 429)"
    )
    max_job_items: int = Field(
        256, ge=1, description="batch-job windows queued or running, at most"
    )
    min_batch_fill: float = Field(
        0.85, ge=0, le=1, description="a window joins a batch only while real/padded tokens >= this"
    )
    max_job_batch_tokens: int = Field(
        4096, ge=1, description="padded tokens per engine run of batch-job windows (kept short)"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a request (then 504)")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="how long shutdown drains the queue")
    drain_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long requests in flight may take to finish"
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="on SIGTERM, how long new work is still taken while /ready is 503 (for load "
        "balancers to notice)",
    )

    # Long documents
    long_document: LongDocumentPolicy = Field(
        "chunk", description="default policy for texts longer than the model's n_max tokens"
    )
    chunk_overlap: int | None = Field(
        None,
        ge=0,
        description="tokens shared by neighbouring windows (default: min(256, n_max // 4))",
    )
    chunk_aggregation: Aggregation = Field(
        "max", description="max: the window with the highest flag score; mean: mean probabilities"
    )
    evidence_segments: int = Field(
        16,
        ge=1,
        description="with return_evidence, a one-window text's paragraphs (else sentences) are "
        "scored as at most this many extra windows",
    )

    # Request limits
    max_chars: int = Field(250_000, ge=1, description="characters per input text (then 413)")
    max_inputs: int = Field(128, ge=1, description="texts per request (then 413)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="request body bytes (then 413)")
    max_tokenize_chars: int = Field(
        1_000_000,
        ge=1,
        description="characters waiting for or in the tokenizer (then 429); also per request (413)",
    )
    max_inflight_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="bytes of classify bodies over 64 KiB being parsed or served at once (then 429)",
    )
    large_body_refusal_delay_ms: float = Field(
        250.0,
        ge=0,
        le=10_000,
        description="how long the refusal of a large body waits before it is sent: the 429 for "
        "one refused before it is read, and the 413 for one read and found too large (its share "
        "of the in-flight bytes held meanwhile); clients that retry at once cycle slower and cost "
        "the host less",
    )

    # Mail and HTML inputs (input_format email or html, message/rfc822 bodies)
    mail_max_parts: int = Field(100, ge=1, description="MIME parts per message (then 413)")
    mail_max_depth: int = Field(10, ge=1, description="nesting levels of MIME parts (then 413)")
    mail_max_decoded_bytes: int = Field(
        2 * 1024 * 1024, ge=1, description="bytes one message's text parts decode to (then 413)"
    )
    mail_max_html_tags: int = Field(
        20_000, ge=1, description="tags per HTML input or part (then 413)"
    )

    # HTTP and operations
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated bearer keys; empty: no auth (prefer LINMOD_API_KEYS or "
        "--api-keys-file: arguments show in ps)",
    )
    api_keys_file: Path | None = Field(
        None, description="a file of bearer keys, one per line (# comments), added to api_keys"
    )
    public_info: bool = Field(
        True, description="serve /info, /docs and /openapi.json without a key (when keys are set)"
    )
    host: str = Field("0.0.0.0", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log_sample: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="the share of answered requests below status 400 that get an access-log line "
        "(evenly spaced; each such line carries sample_rate); errors always get one",
    )
    database_url: str = Field(
        "sqlite:///linmod-jobs.db", description="SQLAlchemy URL for batch-job state"
    )

    # Batch jobs (/v1/files, /v1/batches and the worker that runs them)
    jobs: bool = Field(True, description="serve /v1/files and /v1/batches and run batch jobs")
    job_max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="bytes per uploaded batch file (then 413)"
    )
    job_max_file_lines: int = Field(
        50_000, ge=1, description="requests (non-blank lines) per batch file (then 413)"
    )
    job_quota_files: int = Field(
        1000, ge=1, description="uploaded files one key (or the open server) may hold (then 403)"
    )
    job_quota_bytes: int = Field(
        10 * 1024**3, ge=1, description="bytes of uploaded files one key may hold (then 403)"
    )
    job_claim_lines: int = Field(
        64, ge=1, description="lines a worker claims at once; it holds at most twice this many"
    )
    job_lease_s: float = Field(
        60.0, gt=0, description="a claim lapses this long after its worker's last heartbeat"
    )
    job_poll_s: float = Field(1.0, gt=0, description="how often an idle worker looks for work")
    job_retention_s: float = Field(
        30 * 24 * 3600.0,
        gt=0,
        description="files are deleted this long after upload, batches this long after they end",
    )
    job_cleanup_interval_s: float = Field(
        300.0, gt=0, description="how often expired files and batches are deleted"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(part.strip()) for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _read_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read api_keys_file {self.api_keys_file}: {exc}") from exc
            keys = [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
            if not keys:
                raise ValueError(f"api_keys_file {self.api_keys_file} holds no keys")
            self.api_keys = [*self.api_keys, *(k for k in keys if k not in self.api_keys)]
        return self

    @model_validator(mode="after")
    def _check_budget(self) -> Settings:
        if self.max_batch_size > self.max_batch_tokens:
            raise ValueError("max_batch_size cannot exceed max_batch_tokens")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, built once on first use."""
    return Settings()
