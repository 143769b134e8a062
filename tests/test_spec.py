"""SparsitySpec: versioned JSON round-trip, refusing another model, and every validation error."""
import json

import pytest

from sparse_core.spec import GROUPS, SPEC_VERSION, SparsitySpec, SpecError

FP = "tiny-abc123"


def _spec(method="teal", layers=3):
    values = [[0.1 * (l + 1), 0.2, 0.3, 0.05] for l in range(layers)]
    return SparsitySpec.from_tables(method, values, FP, targets=[[0.5] * 4] * layers, model="tiny", allocation="uniform")


def test_json_round_trip_keeps_everything():
    spec = _spec()
    again = SparsitySpec.from_json(spec.to_json())
    assert again == spec
    assert dict(again.provenance) == {"model": "tiny", "allocation": "uniform"}
    assert json.loads(spec.to_json())["groups"] == list(GROUPS)


def test_spec_for_another_model_is_refused():
    with pytest.raises(SpecError, match="made for model tiny-abc123, not the loaded model other-999"):
        _spec().check_model("other-999", 3)
    with pytest.raises(SpecError, match="covers 3 layers but the model has 4"):
        _spec().check_model(FP, 4)


def _mutated(**change):
    data = _spec().to_dict() | change
    return json.dumps(data)


@pytest.mark.parametrize("text, message", [
    ('{"version": 1, "method": "teal"', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (_mutated(version=SPEC_VERSION + 1), "version 2 is not supported"),
    (_mutated(method="magic"), "Unknown sparsity method 'magic'"),
    (json.dumps({"version": 1, "method": "teal"}), "missing the field"),
    (_mutated(values=[[0.1, 0.2, 0.3]]), "has 3 entries; expected 4"),
    (_mutated(values=[[0.1, float("nan"), 0.3, 0.4]]), "every value must be a finite number"),
    (_mutated(values=[[0.1, -0.2, 0.3, 0.4]]), "cannot be negative"),
    (_mutated(targets=[[0.1, 1.2, 0.3, 0.4]]), "between 0 and 1"),
    (_mutated(values=[[0.1, "x", 0.3, 0.4]]), "must be a number"),
    (_mutated(groups=["a", "b"]), "do not match"),
])
def test_bad_spec_json_gives_one_clear_sentence(text, message):
    with pytest.raises(SpecError, match=message) as info:
        SparsitySpec.from_json(text)
    assert "\n" not in str(info.value)


def test_topk_values_are_sparsities():
    with pytest.raises(SpecError, match="between 0 and 1"):
        SparsitySpec.from_tables("topk", [[0.5, 0.5, 1.5, 0.5]], FP)
    assert SparsitySpec.uniform_topk(2, FP, 0.0).is_dense
