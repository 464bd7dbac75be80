"""ONNX export of a trained ranker, the parity check against torch, and the artifact directory a server loads.

The graph takes `ModelConfig.input_names` (see `ranker.features.SAMPLE_INPUTS` / `EXAMPLE_INPUTS` for dtypes and
shapes; the batch axis is dynamic) and returns `score` (B,) float32, the click probability. The reconstruction head is
training-only and is not in the graph.

An artifact directory (`$LLMCF_HOME/models/<version_id>/`) holds `model.onnx`, `model.pt` (state dict + config, for
fine-tuning from this version), `features.json` + `features.npz` (the feature space) and `manifest.json` (config,
metrics, data and CoT-pool description, retrieval parameters, input specs). The model_versions row's checksum is the
sha256 of `model.onnx`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranker.features import FeatureSpace, input_specs
from ranker.model import ModelConfig, RankerModel, ScoringGraph

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-5
MODEL_ONNX = "model.onnx"
MODEL_PT = "model.pt"
MANIFEST = "manifest.json"
OUTPUT_NAME = "score"


class ParityError(RuntimeError):
    """onnxruntime and torch disagree by more than the tolerance: the artifact must not be served."""


def export_onnx(model: RankerModel, path: Path) -> Path:
    """Export `model` (in eval mode) to `path` with a dynamic batch axis; returns `path`."""
    model.eval()
    graph = ScoringGraph(model)
    sample = random_inputs(model.config, batch=3, seed=0)
    names = model.config.input_names
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter warns about tracing details that do not apply to this static graph (no data-dependent
    # branches); the parity check below is what guards correctness.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            tuple(torch.from_numpy(sample[n]) for n in names),
            str(path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: {0: "batch"} for name in [*names, OUTPUT_NAME]},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return path


def onnx_session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session with pinned thread counts, warmed up (the first run is slow)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    # Vocabularies of size 1 give index-0 inputs, valid for any model: enough to warm the session up.
    warm = random_inputs(ModelConfig("deepfm", "ex_cot" in names, 1, 1, 1), batch=2, seed=1)
    session.run([OUTPUT_NAME], {name: warm[name] for name in names})
    return session


def torch_scores(model: RankerModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        tensors = {name: torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in model.config.input_names}
        return torch.sigmoid(model(tensors).logit).numpy()


def parity(model: RankerModel, session: Any, inputs: dict[str, np.ndarray]) -> float:
    """Max |onnxruntime - torch| over the scores of `inputs`."""
    feeds = {name: np.ascontiguousarray(inputs[name]) for name in model.config.input_names}
    onnx_out = session.run([OUTPUT_NAME], feeds)[0]
    return float(np.max(np.abs(onnx_out - torch_scores(model, feeds)))) if len(onnx_out) else 0.0


def worst_parity(model: RankerModel, path: Path, batches: list[dict[str, np.ndarray]]) -> float:
    """The worst parity over random inputs (all id ranges, masks, missing and pending examples) and the given real
    batches."""
    session = onnx_session(path)
    candidates = [random_inputs(model.config, batch=257, seed=seed) for seed in (11, 12)] + batches
    return max(parity(model, session, inputs) for inputs in candidates)


def check_parity(model: RankerModel, path: Path, batches: list[dict[str, np.ndarray]]) -> float:
    """`worst_parity`; raises `ParityError` above `PARITY_TOLERANCE`."""
    worst = worst_parity(model, path, batches)
    if worst > PARITY_TOLERANCE:
        raise ParityError(f"{path}: onnxruntime and torch differ by {worst:.3g} > {PARITY_TOLERANCE:g}")
    return worst


def random_inputs(config: ModelConfig, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Valid random inputs for a config: ids within the vocabularies, 0/1 masks, unit-ish embeddings."""
    rng = np.random.default_rng(seed)
    upper = {
        "user": config.n_users, "item": config.n_items, "item_tags": config.n_tags, "history": config.n_items,
        "ex_user": config.n_users, "ex_item": config.n_items, "ex_item_tags": config.n_tags,
        "ex_history": config.n_items, "ex_label": 2,
    }
    inputs: dict[str, np.ndarray] = {}
    for spec in input_specs(config.ict):
        shape = (batch, *(int(s) for s in spec.shape))
        if spec.dtype == "int64":
            inputs[spec.name] = rng.integers(0, upper[spec.name], size=shape, dtype=np.int64)
        elif spec.name in {"history_mask", "ex_history_mask", "ex_cot_ready", "ex_present"}:
            inputs[spec.name] = (rng.random(shape) < 0.7).astype(np.float32)
        else:
            values = rng.standard_normal(shape).astype(np.float32)
            inputs[spec.name] = values / np.linalg.norm(values, axis=-1, keepdims=True)
    return inputs


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_artifact(directory: Path, model: RankerModel, space: FeatureSpace, manifest: dict[str, Any]) -> Path:
    """Write the torch weights, the feature space and the manifest beside an exported `model.onnx`."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, directory / MODEL_PT)
    space.save(directory)
    document = {
        **manifest,
        "config": model.config.to_dict(),
        "kind": model.config.kind,
        "onnx": {
            "file": MODEL_ONNX,
            "opset": ONNX_OPSET,
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch"]},
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": ["batch", *s.shape]} for s in input_specs(model.config.ict)],
        },
    }
    (directory / MANIFEST).write_text(json.dumps(document, indent=2, default=str))
    return directory


def load_model(directory: Path) -> tuple[RankerModel, FeatureSpace, dict[str, Any]]:
    """The torch model, feature space and manifest of an artifact directory (to fine-tune or evaluate it)."""
    saved = torch.load(directory / MODEL_PT, map_location="cpu", weights_only=True)
    model = RankerModel(ModelConfig.from_dict(saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), FeatureSpace.load(directory), json.loads((directory / MANIFEST).read_text())

