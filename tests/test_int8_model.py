"""SmolLM2 with int8 weights (--dtype int8): the patched model against HF's own forward on the weights the int8
rows stand for, the native step against the patched model, its dense quality against float32's on the one quality
measurement, what a token reads, and what the load refuses."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_core import cost, fast_decode, generate, metrics, models, quantize
from sparse_core.gguf import default_model_dir
from sparse_core.patch import SparseLinear


@pytest.fixture(scope="module")
def int8():
    return models.load(dtype="int8")


def test_the_int8_model_computes_hf_s_forward_on_the_dequantized_weights(int8):
    """Independent reference: a fresh HF model whose projections and head are set to quantize.dequantize of the
    float weights, run by HF's own forward in float64."""
    reference = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float64, use_safetensors=True)
    with torch.no_grad():
        for module in list(reference.model.layers.modules()) + [reference.lm_head]:
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(quantize.dequantize(*quantize.quantize(module.weight.float()), torch.float64))
    reference.model.embed_tokens.weight = reference.lm_head.weight  # tied, as the int8 model's
    ids = generate.encode_prompt(int8, "The lighthouse keeper found a bottle").ids
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
        prefill = int8.model(torch.tensor([ids])).logits[0]  # more tokens than the gather takes: the dequantized matmul
        alone = int8.model(torch.tensor([ids[:4]])).logits[0]  # four tokens: the int8 row gather
    torch.testing.assert_close(prefill.double(), expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(alone.double(), expected[:4], rtol=0, atol=2e-3)


def test_every_projection_and_the_head_keep_int8_rows_only(int8):
    linears = [m for m in int8.model.modules() if isinstance(m, SparseLinear)]
    assert linears and all(m.int8 for m in linears)
    floats = [n for n, p in int8.model.named_parameters() if p.dtype != torch.int8 and p.dim() == 2 and "scales" not in n]
    assert floats == []  # no float copy of any matrix is kept
    head = int8.model.get_output_embeddings()
    assert isinstance(head, quantize.Int8Linear) and head.q.shape == (576, 49152)
    assert int8.model.get_input_embeddings().head is head  # tied: one copy


def test_int8_dense_quality_is_within_one_percent_of_float32(smollm2, int8):
    float32 = metrics.evaluate(smollm2, smollm2.dense_spec())
    quantized = metrics.evaluate(int8, int8.dense_spec())
    assert quantized.ppl_dense == pytest.approx(float32.ppl_dense, rel=0.01)
    assert quantized.ppl_dense != float32.ppl_dense  # int8 rows, not the float weights


def test_a_token_reads_a_byte_a_weight_and_the_scales(smollm2, int8):
    total32, sparse32 = cost.model_bytes(smollm2)
    total8, sparse8 = cost.model_bytes(int8)
    assert sparse8 * 4 == sparse32  # the projections' rows: a byte each
    scales = sum(p.numel() * 4 for n, p in int8.model.named_parameters() if n.endswith("scales"))
    head = 576 * 49152
    norms = total32 - sparse32 - head * 4
    assert total8 == sparse8 + head + scales + norms
    assert 1.4 < cost.token_cost(int8, 0.5).bound < cost.token_cost(smollm2, 0.5).bound  # the scales are read anyway


def test_the_native_int8_step_makes_hf_s_greedy_tokens(int8):
    prompt = generate.encode_prompt(int8, "Write a short story about a lighthouse keeper.")
    eager = [t.text for t in generate.stream(int8, prompt, None, max_new_tokens=16, stop_at_eos=False)]
    native = list(generate.stream(int8, prompt, None, max_new_tokens=16, stop_at_eos=False, compiled=True))
    assert fast_decode.step_name(int8, None) == "native step" and all(t.compiled for t in native[1:])
    assert [t.text for t in native] == eager


@pytest.mark.parametrize("ask", [dict(layout="cats"), dict(layout="hf")])
def test_int8_where_its_kernel_cannot_run_is_refused_in_one_sentence(ask):
    with pytest.raises(models.ModelLoadError, match=r"^int8 weights run on the CPU, [^.]*\.$"):
        models.load(dtype="int8", **ask)
