"""sparse_core.views on a tiny Llama whose weight counts are worked out by hand below."""

import numpy as np
import pytest
import torch
import transformers as T

from sparse_core import generate, models, views
from sparse_core.cost import token_cost
from sparse_core.spec import GROUPS, SparsitySpec
from sparse_core.trace import SparsityCounter

# hidden 8, intermediate 16, one layer, 2 query heads and 1 KV head of width 4, vocabulary 10. Elements read per token:
#   attention q 8x8 + k 4x8 + v 4x8 = 128 (attn_in), o 8x8 = 64 (attn_out)
#   MLP gate 16x8 + up 16x8 = 256 (mlp_in), down 8x16 = 128 (mlp_mid)         -> 576 sparsifiable
#   two block norms + final norm 3 x 8 = 24, output head 10x8 = 80             -> 680 in all
# (the untied input embedding reads one row per token, so it is not counted)
TOTAL, SPARSIFIABLE = 680, 576


class _Tokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=10, max_position_embeddings=64, tie_word_embeddings=False)
    model = T.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    return models.wrap(model, _Tokenizer(), "tiny")


def test_dense_cost_counts_every_weight_read_once(tiny):
    cost = token_cost(tiny, 0.0)
    assert (cost.dense_bytes, cost.sparse_bytes, cost.bytes_per_element) == (4 * TOTAL, 4 * TOTAL, 4)
    assert cost.dense_macs == cost.sparse_macs == TOTAL
    assert cost.bound == 1.0


def test_half_sparse_cost_bound_and_energy(tiny):
    cost = token_cost(tiny, 0.5, pj_per_byte=20.0)
    assert cost.sparse_macs == TOTAL - SPARSIFIABLE // 2 == 392
    assert cost.sparse_bytes == 4 * 392 == 1568
    assert cost.bound == pytest.approx(2720 / 1568)
    assert cost.energy_uj(cost.dense_bytes) == pytest.approx(2720 * 20e-12 * 1e6)  # 0.0544 µJ
    table = cost.frame().set_index("per token")
    assert table.loc["multiply-adds", "saved"] == pytest.approx(288 / 680)
    assert table.loc["memory energy (µJ)", "sparse"] == pytest.approx(1568 * 20e-6)


def test_bfloat16_halves_the_bytes_not_the_multiply_adds(tiny):
    half = models.wrap(T.AutoModelForCausalLM.from_config(tiny.model.config).to(torch.bfloat16), _Tokenizer(), "tiny16")
    cost = token_cost(half, 0.25)
    assert (cost.dense_bytes, cost.dense_macs) == (2 * TOTAL, TOTAL)
    assert cost.sparse_macs == TOTAL - SPARSIFIABLE // 4


def _teal(model, threshold):
    return SparsitySpec.from_tables("teal", [[threshold] * len(GROUPS)] * model.num_layers, model.fingerprint)


def test_trace_heatmap_data_agrees_with_the_threshold(tiny):
    spec = _teal(tiny, 0.05)
    traced = views.trace_tokens(tiny, spec, list(range(1, 10)) * 40, layer=0, max_tokens=300)
    assert len(traced.tokens) == 300 and traced.tokens[0] == "<7>"  # the last 300 of 360 tokens
    matrix = views.skipped_matrix(traced, "mlp_in")
    assert matrix.shape == (1, 300) and ((matrix >= 0) & (matrix <= 1)).all().all()

    view = views.neuron_view(traced, hot_first=True, max_neurons=10)
    values, thresholds = traced.trace.activation_matrix()
    assert view.activations.shape == (300, 10) and len(view.neurons) == 10
    assert list(view.active_share) == sorted(view.active_share, reverse=True)
    chosen = values[:, torch.as_tensor(view.neurons)].numpy()
    assert np.array_equal(np.isnan(view.activations), chosen <= thresholds.numpy())

    threshold, below = views.threshold_marker(traced, "mlp_mid")
    assert threshold == 0.05
    assert below == pytest.approx(float((values <= 0.05).float().mean()), abs=1e-6)


def test_a_trace_with_a_dense_prefix_sees_what_the_generation_skipped(tiny):
    """A generation's prompt ran dense (its prefill) and its tokens sparse from that cache: the trace of its ids with
    that prefix skips nothing in the prompt and, token for token, what the generation's decode steps skipped."""
    from sparse_core.trace import Trace
    spec, ids, prefix = _teal(tiny, 0.5), list(range(1, 10)) * 3, 9
    traced = views.trace_tokens(tiny, spec, ids, layer=0, dense_prefix=prefix)
    matrix = views.skipped_matrix(traced, "mlp_in")
    assert matrix.shape == (1, len(ids)) and (matrix.iloc[0, :prefix] == 0).all()
    generation = Trace(activation_layer=0)
    session = generate.HFSession(tiny, spec, observers=(generation,))
    with torch.inference_mode():
        session.prefill(ids[:prefix])
        for token in ids[prefix:]:
            session.step(token)
    stepped = generation.skipped_frame()
    expected = stepped[stepped.group == "mlp_in"].skipped.to_numpy()
    assert expected.mean() > 0.1  # the decode steps do skip
    np.testing.assert_allclose(matrix.iloc[0, prefix:].to_numpy(), expected, atol=1e-6)


def test_dense_trace_has_no_threshold_marker(tiny):
    traced = views.trace_tokens(tiny, None, [1, 2, 3, 4], layer=0)
    assert views.threshold_marker(traced, "attn_in") == (None, 0.0)


def test_neuron_view_puts_hot_neurons_first_only_when_asked(tiny):
    traced = views.trace_tokens(tiny, _teal(tiny, 0.05), list(range(1, 10)) * 4, layer=0)
    values, _ = traced.trace.activation_matrix()
    hot = views.neuron_view(traced, hot_first=True)
    strength = values.mean(0).numpy()[hot.neurons]
    ranked = list(zip(hot.active_share, strength))
    assert ranked == sorted(ranked, reverse=True)  # most often active first, the stronger first among equals
    assert sorted(hot.neurons) == list(range(16))
    assert list(views.neuron_view(traced, hot_first=False, max_neurons=10).neurons) == list(range(10))


def test_token_labels_show_whitespace_and_shorten_long_words():
    tokens = [" the", "\n", " lighthouse", "\tkeeper", " the"]
    assert views.token_labels(tokens) == ["·the", "↵", "·lighth…", "⇥keeper", "·the"]  # 8 characters at most
    assert views.token_labels(tokens, max_chars=None)[2] == "·lighthouse"


def test_color_range_ignores_outliers_and_skipped_cells():
    values = np.append(np.linspace(0.0, 1.0, 99), [8.0, np.nan])
    low, high = views.color_range(values, 1, 99)
    assert 0.0 <= low < 0.02 and 0.98 < high < 1.1  # the 8 would have squashed everything else into one colour
    assert views.color_range(np.zeros(5), 2, 98) == (None, None)
    assert views.color_range(np.full(3, np.nan), 2, 98) == (None, None)


def test_per_layer_frame_and_decode_breakdown(tiny):
    counter = SparsityCounter()
    prompt = generate.Prompt((1, 2, 3), 0)
    list(generate.stream(tiny, prompt, _teal(tiny, 0.05), 3, observers=[counter], stop_at_eos=False))
    frame = views.per_layer_frame(tiny, counter, "teal")
    assert list(frame.columns) == ["layer", "skipped", *GROUPS] and 0 < frame["skipped"][0] < 1

    breakdown = views.decode_step_breakdown(tiny, prompt, _teal(tiny, 0.05), new_tokens=3)
    assert list(breakdown.frame["part"]) == ["layer 0", "rest"]
    assert (breakdown.frame[["dense_ms", "sparse_ms"]] > 0).all().all()
    assert (breakdown.frame[["dense_iqr_ms", "sparse_iqr_ms"]] >= 0).all().all()
    assert 1.0 <= breakdown.bound < 2.0


def test_a_layer_timing_above_its_bound_or_with_a_moving_rest_is_flagged(tiny, monkeypatch):
    """The same guards as the decode benchmark: a whole-step speedup above 1.05 x its bound is not a result, and
    neither is one whose never-sparsified rest changed between the runs (the machine's pace moved)."""
    prompt = generate.Prompt((1, 2, 3), 0)
    spec = _teal(tiny, 0.05)
    pace = {"dense": (0.005, 0.005), "sparse": (0.002, 0.002)}  # (layer, rest) seconds: sparse 2.5x faster overall

    def timed(model, prompt, run_spec, new_tokens):
        layer, rest = pace["dense" if run_spec is None else "sparse"]
        return [[layer] * (new_tokens + 1)], [layer + rest] * (new_tokens + 1)
    monkeypatch.setattr(views, "_timed_layers", timed)
    assert views.decode_step_breakdown(tiny, prompt, spec, new_tokens=3).flag.startswith("invalid")
    pace["sparse"] = (0.0065, 0.004)  # slower overall, but the rest no sparsity touches moved by 20 %
    assert "never-sparsified rest" in views.decode_step_breakdown(tiny, prompt, spec, new_tokens=3).flag
    pace["sparse"] = (0.0049, 0.005)  # the layer a little faster, the rest the same: a result
    assert views.decode_step_breakdown(tiny, prompt, spec, new_tokens=3).flag is None
