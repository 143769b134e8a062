"""Greedy allocation on a tiny random Llama: each unit's cost is the model's output KL with that unit alone sparse
(checked against whole forward passes), the allocation lands on every target over the whole model, one
target's table is the same alone or among others, and at the same share of weight reads skipped the model's KL is
lower than uniform sparsity's (the quality it optimises)."""
import threading

import pytest
import torch
import transformers as T

from sparse_core import models, tuning
from sparse_core.patch import sparsity
from sparse_core.spec import GROUPS, SparsitySpec
from sparse_core.trace import AbsHistogram

TARGETS = [0.25, 0.5, 0.6]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(7)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)
    model = models.wrap(T.AutoModelForCausalLM.from_config(config).eval(), tokenizer=None, name="tiny-llama")
    ids = torch.randint(0, 96, (1, 48))
    histogram = AbsHistogram()
    with torch.no_grad(), sparsity(None, [histogram]):
        model.model(ids)
    costs = tuning.unit_costs(model, "teal", ids, histogram)
    return model, ids, histogram, costs


def _thresholds(model, histogram, table):
    values = [[histogram.quantile(l, g, t) for g, t in zip(GROUPS, row)] for l, row in enumerate(table)]
    return SparsitySpec.from_tables("teal", values, model.fingerprint)


def _kl(model, ids, spec, scored: int = 0) -> float:
    """KL(dense ‖ sparse) per token over `ids` (the last `scored` positions; 0: all), from two whole forward passes."""
    with torch.no_grad():
        dense = torch.log_softmax(model.model(ids).logits[0, -scored:].double(), -1)
        with sparsity(spec):
            sparse = torch.log_softmax(model.model(ids).logits[0, -scored:].double(), -1)
    return float((dense.exp() * (dense - sparse)).sum(-1).mean())


def test_a_units_cost_is_the_models_kl_with_that_unit_alone_sparse(tiny):
    """Checked against whole forward passes with one spec each (no block replaced by its record, no batch of
    levels), on the positions it scores: the last half."""
    model, ids, histogram, costs = tiny
    assert set(costs) == {(layer, group) for layer in range(model.num_layers) for group in GROUPS}
    for layer, group in [(0, "attn_in"), (1, "attn_out"), (2, "mlp_mid")]:
        for level, cost in zip(tuning.LEVELS, costs[layer, group]):
            values = [[0.0] * 4 for _ in range(model.num_layers)]
            values[layer][GROUPS.index(group)] = histogram.quantile(layer, group, level)
            alone = _kl(model, ids, SparsitySpec.from_tables("teal", values, model.fingerprint), scored=ids.shape[-1] // 2)
            assert cost == pytest.approx(alone, rel=1e-4, abs=1e-9)
    assert all(curve[-1] > curve[0] >= 0 for curve in costs.values())  # more sparsity costs more
    assert all(layer.__dict__.get("forward") is None for layer in model.model.model.layers)  # records put away


def test_greedy_lands_on_each_target_over_the_whole_model(tiny):
    model, ids, histogram, costs = tiny
    tables = tuning.allocate(model, "teal", costs, TARGETS)
    weights = model.skippable_params("teal")
    total = sum(sum(row.values()) for row in weights)
    assert sorted(tables) == TARGETS
    for target, table in tables.items():
        reached = sum(t * weights[layer][g] for layer, row in enumerate(table) for g, t in zip(GROUPS, row)) / total
        assert reached == pytest.approx(target, abs=1e-5)
        assert all(0.0 <= t <= tuning.MAX_GROUP_SPARSITY + 1e-9 for row in table for t in row)
        assert len({round(t, 3) for row in table for t in row}) > 1  # not uniform in disguise
    assert tuning.allocate(model, "teal", costs, [0.5])[0.5] == tables[0.5]  # one table per target, whoever asks


def test_greedy_costs_the_model_less_than_uniform_at_the_same_reads_skipped(tiny):
    model, ids, histogram, costs = tiny
    for target in (0.4, 0.5):
        table = tuning.allocate(model, "teal", costs, [target])[target]
        uniform = [[target] * 4 for _ in range(model.num_layers)]
        assert _kl(model, ids, _thresholds(model, histogram, table)) < _kl(model, ids, _thresholds(model, histogram, uniform))


def test_cats_greedy_moves_only_the_intermediate(tiny):
    model, ids, _, _ = tiny
    histogram = AbsHistogram(("mlp_mid",))
    cats_zero = SparsitySpec.from_tables("cats", model.dense_spec().values, model.fingerprint)
    with torch.no_grad(), sparsity(cats_zero, [histogram]):
        model.model(ids)
    table = tuning.greedy_targets(model, "cats", [0.4], ids, histogram)[0.4]
    assert all(row[:3] == [0.0, 0.0, 0.0] for row in table)
    assert sum(row[3] for row in table) / len(table) == pytest.approx(0.4)  # every layer's down is the same size


def test_greedy_can_be_cancelled(tiny):
    model, ids, histogram, _ = tiny
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(tuning.Cancelled):
        tuning.greedy_targets(model, "teal", [0.5], ids, histogram, cancel=cancel)
