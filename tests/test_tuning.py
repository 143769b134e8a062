"""Greedy per-layer allocation on a tiny random Llama: it lands on every target, block by block, and its blocks
err less than uniform sparsity at the same target (the objective it optimises)."""
import threading

import pytest
import torch
import transformers as T

from sparse_core import models, patch, tuning
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
    return model, ids, histogram


def _thresholds(model, histogram, table):
    values = [[histogram.quantile(l, g, t) for g, t in zip(GROUPS, row)] for l, row in enumerate(table)]
    return SparsitySpec.from_tables("teal", values, model.fingerprint)


def test_greedy_lands_on_each_target_in_every_block(tiny):
    model, ids, histogram = tiny
    tables = tuning.greedy_targets(model, "teal", TARGETS, ids, histogram, step=0.1)
    weights = model.skippable_params("teal")
    assert sorted(tables) == TARGETS
    for target, table in tables.items():
        for layer, row in enumerate(table):
            reached = sum(t * weights[layer][g] for g, t in zip(GROUPS, row)) / sum(weights[layer].values())
            assert reached == pytest.approx(target, abs=1e-5)
            assert all(0.0 <= t <= tuning.MAX_GROUP_SPARSITY for t in row)
        assert len({round(t, 3) for row in table for t in row}) > 1  # not uniform in disguise


def test_greedy_errs_less_than_uniform_on_its_objective(tiny):
    model, ids, histogram = tiny
    blocks = tuning._record_blocks(model, ids)
    layers = patch.decoder_layers(model.model)
    table = tuning.greedy_targets(model, "teal", [0.5], ids, histogram, step=0.05)[0.5]

    def block_errors(spec):
        errors = []
        for layer, (args, kwargs, dense) in enumerate(blocks):
            alone = [list(row) if l == layer else [0.0] * 4 for l, row in enumerate(spec.values)]
            with torch.no_grad(), sparsity(SparsitySpec.from_tables("teal", alone, model.fingerprint)):
                out = layers[layer](*args, **kwargs)
            errors.append(float((out - dense).pow(2).sum()))
        return sum(errors)
    uniform = [[0.5] * 4 for _ in range(model.num_layers)]
    assert block_errors(_thresholds(model, histogram, table)) < block_errors(_thresholds(model, histogram, uniform))


def test_cats_greedy_moves_only_the_intermediate(tiny):
    model, ids, _ = tiny
    histogram = AbsHistogram(("mlp_mid",))
    cats_zero = SparsitySpec.from_tables("cats", model.dense_spec().values, model.fingerprint)
    with torch.no_grad(), sparsity(cats_zero, [histogram]):
        model.model(ids)
    table = tuning.greedy_targets(model, "cats", [0.4], ids, histogram)[0.4]
    assert all(row[:3] == [0.0, 0.0, 0.0] and row[3] == pytest.approx(0.4) for row in table)


def test_greedy_can_be_cancelled(tiny):
    model, ids, histogram = tiny
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(tuning.Cancelled):
        tuning.greedy_targets(model, "teal", [0.5], ids, histogram, cancel=cancel)
