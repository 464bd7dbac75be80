"""Which model version the server scores with, and swapping it without stopping: `ModelBundle` and `ModelHolder`.

A bundle is immutable (ONNX session + feature space + manifest of one version); the holder keeps ONE reference to the
current bundle and replaces it with a single assignment, so a request that took the bundle at its start finishes on
it, and every response names exactly the version that scored it.

Choosing the version (kind = `LLMCF_RANKER_KIND`, or pinned with `--version`):
- the newest `model_versions` row with status 'serving' for the kind;
- if no row of the kind is 'serving' and nothing is loaded yet, the newest 'candidate' is promoted to 'serving' (the
  first deployment: `llmcf train` then `llmcf serve` just works); later promotions are `llmcf update`'s business.
`poll()` runs every `LLMCF_RANKER_MODEL_POLL_S` on a daemon thread and swaps when the serving row names another version
(a newer one, or an older one rolled back to). Loading = read the row, check the ONNX file's sha256 against the row's
checksum and the parity recorded at export against the tolerance, open the session with pinned threads, load the
feature space and manifest, run a warm-up batch, encode the example pool for it (`prepare`); only then swap. If any
step fails the old bundle stays, the failure is logged and counted (`llmcf_ranker_model_swaps_total{outcome="failed"}`),
and that version is retried after `RETRY_FAILED_S`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ranker.export import (
    EX_TOKENS_NAME,
    MANIFEST,
    OUTPUT_NAME,
    PARITY_TOLERANCE,
    TOKENS_NAME,
    onnx_session,
    random_inputs,
    sha256_file,
)
from ranker.features import FeatureSpace
from ranker.model import ModelConfig
from ranker.serving.metrics import MODEL_AGE, MODEL_INFO, MODEL_SWAPS
from storage.registry import ModelVersionRecord
from storage.repository import Repository

log = logging.getLogger(__name__)

WARMUP_BATCH = 100
RETRY_FAILED_S = 60.0


class ModelLoadError(RuntimeError):
    """A model version cannot be served (missing row or file, checksum mismatch, broken artifact)."""


@dataclass(frozen=True)
class ModelBundle:
    """Everything one version needs to score, loaded and warmed; never mutated after construction."""

    version_id: str
    kind: str
    created_at: datetime
    config: ModelConfig
    session: Any
    space: FeatureSpace
    manifest: dict[str, Any]
    examples_session: Any = None  # ICT: the example encoder (tokens of pool samples), None for older artifacts
    scorer_session: Any = None  # ICT: the query scorer (sample inputs + example tokens)

    @property
    def ict(self) -> bool:
        return self.config.ict

    @property
    def split(self) -> bool:
        """Whether requests are scored by the query scorer over cached example tokens (else by the full graph)."""
        return self.examples_session is not None and self.scorer_session is not None

    def encode_examples(self, inputs: dict[str, Any]) -> Any:
        """Tokens (P, 3, d) of P examples' row inputs, by the example encoder."""
        return self.examples_session.run([TOKENS_NAME],
                                         {name: inputs[name] for name in self.config.example_row_input_names})[0]

    def run_with_tokens(self, inputs: dict[str, Any], tokens: Any, present: Any) -> Any:
        """Scores (B,) from the sample inputs and (B, K, 3, d) example tokens, by the query scorer."""
        feeds = {name: inputs[name] for name in self.config.sample_input_names}
        return self.scorer_session.run([OUTPUT_NAME], {**feeds, EX_TOKENS_NAME: tokens, "ex_present": present})[0]

    @property
    def input_names(self) -> list[str]:
        return self.config.input_names

    def run(self, inputs: dict[str, Any]) -> Any:
        """Scores (B,) float32 for model inputs by name."""
        return self.session.run([OUTPUT_NAME], {name: inputs[name] for name in self.config.input_names})[0]


def load_bundle(record: ModelVersionRecord, threads: int) -> ModelBundle:
    """Load, verify and warm one version; raises `ModelLoadError` saying what is wrong."""
    onnx_path = Path(record.artifact_path)
    if not onnx_path.is_file():
        raise ModelLoadError(f"model version {record.version_id}: artifact {onnx_path} does not exist")
    checksum = sha256_file(onnx_path)
    if checksum != record.checksum:
        raise ModelLoadError(f"model version {record.version_id}: {onnx_path} has sha256 {checksum[:12]}..., "
                             f"the model_versions row says {record.checksum[:12]}...")
    parity_at_export = record.metrics.get("onnx_parity_max_abs_diff")
    if parity_at_export is not None and parity_at_export > PARITY_TOLERANCE:
        # Only a candidate the updater refused is exported without the parity check (`ranker.updates.rounds`).
        raise ModelLoadError(f"model version {record.version_id} is not servable: its ONNX scores differed from torch's "
                             f"by {parity_at_export:.3g} > {PARITY_TOLERANCE:g} at export")
    directory = onnx_path.parent
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        config = ModelConfig.from_dict(manifest["config"])
        space = FeatureSpace.load(directory)
        session = onnx_session(onnx_path, threads)
        split = manifest.get("onnx", {}).get("split")
        examples_session = scorer_session = None
        if config.ict and split:
            examples_session = onnx_session(_verified(directory, split["examples"], record.version_id), threads)
            scorer_session = onnx_session(_verified(directory, split["scorer"], record.version_id), threads)
        bundle = ModelBundle(record.version_id, record.kind, record.created_at, config, session, space, manifest,
                             examples_session, scorer_session)
        if config.kind != record.kind:
            raise ModelLoadError(f"model version {record.version_id} is recorded as {record.kind} but its artifact "
                                 f"is {config.kind}")
        # A batch of the usual request size: onnxruntime sizes its buffers on the first runs of a shape.
        bundle.run(random_inputs(config, batch=WARMUP_BATCH, seed=2))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model version {record.version_id}: cannot load {directory}: {type(exc).__name__}: {exc}") from exc
    return bundle


def _verified(directory: Path, entry: dict[str, Any], version_id: str) -> Path:
    """A split graph's path once its sha256 matches the manifest's."""
    path = directory / entry["file"]
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise ModelLoadError(f"model version {version_id}: {path} is missing or does not match its sha256 in the manifest")
    return path


class ModelHolder:
    """The current `ModelBundle` (None until one is loaded) and the polling that keeps it up to date."""

    def __init__(self, repository: Repository, kind: str, threads: int = 1, pinned_version: str | None = None,
                 poll_s: float = 5.0, prepare: Callable[[ModelBundle], None] | None = None) -> None:
        self.repository = repository
        self.prepare = prepare  # run on a loaded bundle before it is swapped in (the scorer encodes its examples)
        self.kind = kind
        self.threads = threads
        self.pinned_version = pinned_version
        self.poll_s = poll_s
        self.current: ModelBundle | None = None
        self.last_error: str | None = None
        self._failed: dict[str, float] = {}
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        MODEL_AGE.set_function(self._model_age)

    def _model_age(self) -> float:
        bundle = self.current
        return 0.0 if bundle is None else max(0.0, time.time() - bundle.created_at.timestamp())

    # ---- loading ----------------------------------------------------------------------------------------------------

    def load(self, version_id: str) -> ModelBundle:
        """Load `version_id` (any status) and swap it in; raises `ModelLoadError` and keeps the old bundle on failure.
        Tests and `--version` call this directly."""
        record = self._record(version_id)
        with self._load_lock:
            return self._swap(record)

    def _record(self, version_id: str) -> ModelVersionRecord:
        record = self.repository.get_model_version(version_id)
        if record is None:
            raise ModelLoadError(f"no model version {version_id!r} in model_versions")
        return record

    def _swap(self, record: ModelVersionRecord) -> ModelBundle:
        try:
            bundle = load_bundle(record, self.threads)
            if self.prepare is not None:
                try:
                    self.prepare(bundle)
                except Exception as exc:
                    raise ModelLoadError(f"model version {record.version_id}: preparing it for serving failed: "
                                         f"{type(exc).__name__}: {exc}") from exc
        except ModelLoadError as exc:
            MODEL_SWAPS.labels(outcome="failed").inc()
            self._failed[record.version_id] = time.monotonic()
            self.last_error = str(exc)
            log.error("model swap failed, still serving %s: %s",
                      self.current.version_id if self.current else "nothing", exc)
            raise
        previous, self.current = self.current, bundle  # the one atomic step: requests see old or new, never a mix
        self.last_error = None
        self._failed.pop(record.version_id, None)
        MODEL_SWAPS.labels(outcome="ok").inc()
        if previous is not None:
            MODEL_INFO.remove(previous.version_id, previous.kind)
        MODEL_INFO.labels(version=bundle.version_id, kind=bundle.kind).set(1)
        log.info("serving model version %s (%s)%s", bundle.version_id, bundle.kind,
                 f", replacing {previous.version_id}" if previous else "")
        return bundle

    def poll(self) -> bool:
        """One check for the version to serve; loads and swaps it if it is not the current one. True if it swapped.
        Errors (database, artifact) are logged and leave the current bundle in place."""
        try:
            record = self._wanted()
        except Exception:
            log.exception("cannot read model_versions; keeping the current model")
            return False
        current = self.current
        if record is None or (current is not None and record.version_id == current.version_id):
            return False
        failed_at = self._failed.get(record.version_id)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_S:
            return False
        with self._load_lock:
            try:
                self._swap(record)
            except ModelLoadError:
                return False
        return True

    def _wanted(self) -> ModelVersionRecord | None:
        if self.pinned_version is not None:
            return self._record(self.pinned_version)
        serving = self.repository.latest_model_version(self.kind, status="serving")
        if serving is not None or self.current is not None:
            return serving
        candidate = self.repository.latest_model_version(self.kind, status="candidate")
        if candidate is None:
            self.last_error = f"no model version of kind {self.kind}: run `llmcf train`"
            return None
        self.repository.set_model_status(candidate.version_id, "serving",
                                         notes=f"promoted by llmcf serve at {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}: "
                                         f"no {self.kind} version was serving")
        log.info("no %s version was serving: promoted the newest candidate %s", self.kind, candidate.version_id)
        return self.repository.latest_model_version(self.kind, status="serving")

    # ---- background polling -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Poll once now, then every `poll_s` on a daemon thread (not when a version is pinned: it never changes)."""
        self.poll()
        if self.pinned_version is None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ranker-model-poll", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
