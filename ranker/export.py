"""ONNX export of a trained ranker, the parity check against torch, and the artifact directory a server loads.

The graph takes `ModelConfig.input_names` (see `ranker.features.SAMPLE_INPUTS` / `EXAMPLE_INPUTS` for dtypes and
shapes; the batch axis is dynamic) and returns `score` (B,) float32, the click probability. The reconstruction head is
training-only and is not in the graph.

An ICT model is also exported split in two, which is what the server runs: an example's three tokens depend only on
the example, so `examples.onnx` (the example encoder: `EXAMPLE_ROW_INPUTS` of P pool samples -> `tokens` (P, 3, d))
runs once per pool sample and version, and `scorer.onnx` (the query scorer: `SAMPLE_INPUTS`, `ex_tokens` (B, K, 3, d)
and `ex_present` (B, K) -> `score`) runs per request. Both are parity-checked against torch, and their composition
against the full graph (`check_split_parity`); their sha256 are in the manifest.

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

from llmcf.samples import unit_rows
from ranker.features import FeatureSpace, input_specs
from ranker.model import TOKENS_PER_EXAMPLE, ExampleEncoderGraph, ModelConfig, QueryScorerGraph, RankerModel, ScoringGraph

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-5
MODEL_ONNX = "model.onnx"
EXAMPLES_ONNX = "examples.onnx"
SCORER_ONNX = "scorer.onnx"
TOKENS_NAME = "tokens"
EX_TOKENS_NAME = "ex_tokens"
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


def export_split(model: RankerModel, directory: Path) -> tuple[Path, Path]:
    """Export an ICT model's example encoder and query scorer beside its full graph; returns their paths."""
    model.eval()
    rows = random_inputs(model.config, batch=3, seed=0)
    example_names = model.config.example_row_input_names
    example_rows = {name: rows[name][:, 0] for name in example_names}  # one example per row: (P, ...) without K
    with torch.inference_mode():
        tokens = model.example_tokens({k: torch.from_numpy(v) for k, v in rows.items()})
    sample_names = model.config.sample_input_names
    examples_path, scorer_path = directory / EXAMPLES_ONNX, directory / SCORER_ONNX
    _export(ExampleEncoderGraph(model), tuple(torch.from_numpy(example_rows[n]) for n in example_names), examples_path,
            example_names, TOKENS_NAME)
    _export(QueryScorerGraph(model), (*(torch.from_numpy(rows[n]) for n in sample_names), tokens.clone(),
                                      torch.from_numpy(rows["ex_present"])),
            scorer_path, [*sample_names, EX_TOKENS_NAME, "ex_present"], OUTPUT_NAME)
    return examples_path, scorer_path


def _export(graph: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, names: list[str], output: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing notes that do not apply to these static graphs; parity guards them
        torch.onnx.export(graph, args, str(path), input_names=names, output_names=[output],
                          dynamic_axes={name: {0: "batch"} for name in [*names, output]}, opset_version=ONNX_OPSET,
                          dynamo=False)


def split_scores(examples: Any, scorer: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Scores of (B, K) example inputs through the two served graphs: every example encoded, then the scorer."""
    present = inputs["ex_present"]
    batch, k = present.shape
    feeds = {name: np.ascontiguousarray(inputs[name].reshape(batch * k, *inputs[name].shape[2:]))
             for name in session_inputs(examples)}
    tokens = examples.run([TOKENS_NAME], feeds)[0].reshape(batch, k, TOKENS_PER_EXAMPLE, -1)
    query = {name: np.ascontiguousarray(inputs[name]) for name in session_inputs(scorer)
             if name not in (EX_TOKENS_NAME, "ex_present")}
    return scorer.run([OUTPUT_NAME], {**query, EX_TOKENS_NAME: tokens, "ex_present": np.ascontiguousarray(present)})[0]


def session_inputs(session: Any) -> list[str]:
    """The input names an onnxruntime session takes (a graph without a user-tag field takes no `user_tags`)."""
    return [node.name for node in session.get_inputs()]


def check_split_parity(model: RankerModel, examples_path: Path, scorer_path: Path,
                       batches: list[dict[str, np.ndarray]], enforce: bool = True) -> float:
    """Max |split graphs - torch| over random inputs and the given real batches; raises `ParityError` above the
    tolerance when `enforce`."""
    examples, scorer = onnx_session(examples_path), onnx_session(scorer_path)
    candidates = [random_inputs(model.config, batch=257, seed=seed) for seed in (13, 14)] + batches
    worst = 0.0
    for inputs in candidates:
        if len(inputs["user"]):
            worst = max(worst, float(np.max(np.abs(split_scores(examples, scorer, inputs) - torch_scores(model, inputs)))))
    if enforce and worst > PARITY_TOLERANCE:
        raise ParityError(f"{scorer_path.parent}: the split graphs and torch differ by {worst:.3g} > {PARITY_TOLERANCE:g}")
    return worst


def onnx_session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session with pinned thread counts, warmed up (the first run is slow)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, warmup_feeds(session, batch=2))
    return session


def warmup_feeds(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Valid inputs of any of the ranker's graphs (index 0 is valid in every vocabulary), from its declared inputs."""
    feeds = {}
    for node in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in node.shape]
        dtype = np.int64 if node.type == "tensor(int64)" else np.float32
        feeds[node.name] = np.zeros(shape, dtype=dtype) if dtype == np.int64 else np.full(shape, 0.5, dtype=dtype)
    return feeds


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
        "user_tags": config.n_user_tags, "ex_user_tags": config.n_user_tags, "history_label": 3, "ex_history_label": 3,
        "ex_user": config.n_users, "ex_item": config.n_items, "ex_item_tags": config.n_tags,
        "ex_history": config.n_items, "ex_label": 2,
    }
    inputs: dict[str, np.ndarray] = {}
    for spec in input_specs(config.ict, config.n_user_tags > 0, config.history_labels):
        shape = (batch, *(int(s) for s in spec.shape))
        if spec.dtype == "int64":
            inputs[spec.name] = rng.integers(0, upper[spec.name], size=shape, dtype=np.int64)
        elif spec.name in {"history_mask", "ex_history_mask", "ex_cot_ready", "ex_present"}:
            inputs[spec.name] = (rng.random(shape) < 0.7).astype(np.float32)
        else:
            values = rng.standard_normal(shape).astype(np.float32)
            inputs[spec.name] = unit_rows(values)
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
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": ["batch", *s.shape]}
                       for s in input_specs(model.config.ict, model.config.n_user_tags > 0, model.config.history_labels)],
        },
    }
    if (directory / EXAMPLES_ONNX).is_file():
        document["onnx"]["split"] = {
            "examples": {"file": EXAMPLES_ONNX, "sha256": sha256_file(directory / EXAMPLES_ONNX), "output": TOKENS_NAME,
                         "inputs": model.config.example_row_input_names},
            "scorer": {"file": SCORER_ONNX, "sha256": sha256_file(directory / SCORER_ONNX), "output": OUTPUT_NAME,
                       "inputs": [*model.config.sample_input_names, EX_TOKENS_NAME, "ex_present"]},
        }
    (directory / MANIFEST).write_text(json.dumps(document, indent=2, default=str))
    return directory


def load_model(directory: Path) -> tuple[RankerModel, FeatureSpace, dict[str, Any]]:
    """The torch model, feature space and manifest of an artifact directory (to fine-tune or evaluate it)."""
    saved = torch.load(directory / MODEL_PT, map_location="cpu", weights_only=True)
    model = RankerModel(ModelConfig.from_dict(saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), FeatureSpace.load(directory), json.loads((directory / MANIFEST).read_text())

