"""bfloat16 models' multi-token products in float32 arithmetic, where a CPU's bfloat16 GEMM is slow (bf16_math): the
same logits as torch's own bfloat16 products within bfloat16 rounding, the same calibrated thresholds, and the
products really widened. Both routes run on any CPU here: SPARSE_LAB_BF16_MATH chooses."""
import pytest
import torch
import transformers as T

from sparse_core import bf16_math, calibrate, models


@pytest.fixture
def choose(monkeypatch):
    """choose("float32" | "native"): the route every bfloat16 model's products take from now on in this test."""
    def chosen(route: str) -> None:
        monkeypatch.setenv("SPARSE_LAB_BF16_MATH", route)
        bf16_math._slow_bf16_gemm.cache_clear()
    yield chosen
    monkeypatch.delenv("SPARSE_LAB_BF16_MATH")
    bf16_math._slow_bf16_gemm.cache_clear()


@pytest.fixture
def widened(monkeypatch):
    """How many bfloat16 tensors Float32Products widened so far (a list of one count)."""
    count = [0]
    widen = bf16_math._widened

    def counting(value):
        count[0] += isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16
        return widen(value)
    monkeypatch.setattr(bf16_math, "_widened", counting)
    return count


def test_a_tiny_bfloat16_model_gives_the_same_logits_either_way(choose, widened):
    torch.manual_seed(3)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)
    model = models.wrap(T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval(), tokenizer=None,
                        name="tiny-llama-bf16")
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(2))
    logits = {}
    for route in ("native", "float32"):
        choose(route)
        before = widened[0]
        with torch.inference_mode():
            logits[route] = model.model(ids).logits
        assert logits[route].dtype == torch.bfloat16
        assert (widened[0] > before) == (route == "float32")  # every product widened, or none
    torch.testing.assert_close(logits["float32"].float(), logits["native"].float(), rtol=0, atol=0.05)


def test_smollm2_in_bfloat16_calibrates_the_same_thresholds_either_way(choose, widened, monkeypatch):
    model = models.load(dtype="bfloat16")
    text = calibrate.default_text("calibration")[:3000]  # a few hundred tokens: one chunk
    quantiles = {}
    for route in ("native", "float32"):
        choose(route)
        monkeypatch.setattr(calibrate, "_HISTOGRAMS", calibrate.BoundedCache(4))  # measured again, not remembered
        histogram = calibrate.score_histograms(model, "teal", text)
        quantiles[route] = torch.tensor([[histogram.quantile(layer, group, target) for group in histogram.groups
                                          for target in (0.25, 0.5)] for layer in range(model.num_layers)])
    assert widened[0] > 0
    torch.testing.assert_close(quantiles["float32"], quantiles["native"], rtol=0.02, atol=1e-3)
