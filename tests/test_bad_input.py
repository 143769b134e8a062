"""Every way a user can feed the engine something wrong, as a table: case -> the one sentence they get.

Each case must raise the engine's own error type (never a traceback from deep inside torch) with a message of one
line; the model keeps working afterwards. Cases that are legal but extreme (0 % / 100 % sparsity, emoji-only or
over-long prompts) must simply work."""
import json

import pytest
import torch

from sparse_core import calibrate, generate, models
from sparse_core.spec import SparsitySpec, SpecError

GOOD = None  # filled by the fixture: a valid spec for the real model, as a dict


@pytest.fixture(scope="module")
def good(smollm2):
    return smollm2.topk_spec(0.3).to_dict()


def _spec_json(good, **change):
    return json.dumps(good | change)


CASES = [
    ("malformed spec JSON", lambda m, g: SparsitySpec.from_json("{version: 1"), "The spec is not valid JSON"),
    ("truncated spec JSON", lambda m, g: SparsitySpec.from_json(json.dumps(g)[:40]), "The spec is not valid JSON"),
    ("spec for another model", lambda m, g: m.check(SparsitySpec.from_json(_spec_json(g, model_fingerprint="gpt2-0123456789ab"))),
     "This spec was made for model gpt2-0123456789ab, not the loaded model SmolLM2-135M-Instruct-"),
    ("spec of another version", lambda m, g: SparsitySpec.from_json(_spec_json(g, version=7)), "Spec version 7 is not supported"),
    ("NaN target", lambda m, g: calibrate.calibrate(m, "teal", float("nan")), "The target sparsity nan must lie between 0 and 1."),
    ("negative target", lambda m, g: calibrate.calibrate(m, "teal", -0.1), "The target sparsity -0.1 must lie between 0 and 1."),
    ("target above 1", lambda m, g: calibrate.calibrate(m, "teal", 1.5), "The target sparsity 1.5 must lie between 0 and 1."),
    ("NaN threshold", lambda m, g: SparsitySpec.from_json(_spec_json(g, method="teal", values=[[0.1, float("nan"), 0, 0]] * 30)),
     "values[0][attn_out] is nan; every value must be a finite number."),
    ("negative threshold", lambda m, g: SparsitySpec.from_json(_spec_json(g, method="teal", values=[[0.1, -1, 0, 0]] * 30)),
     "values[0][attn_out] is -1.0; values cannot be negative."),
    ("top-k sparsity above 1", lambda m, g: SparsitySpec.from_json(_spec_json(g, values=[[1.2, 0, 0, 0]] * 30)),
     "values[0][attn_in] is 1.2; a sparsity must lie between 0 and 1."),
    ("missing layers", lambda m, g: m.check(SparsitySpec.from_json(_spec_json(g, values=g["values"][:12], targets=None))),
     "This spec covers 12 layers but the model has 30."),
    ("unknown model id, no network", lambda m, g: models.load("no-such-org/no-such-model"), "Could not find model 'no-such-org/no-such-model'"),
    ("a path that is not a model", lambda m, g: models.load(str(calibrate.ASSETS)), "the folder has no config.json, so it is not a Hugging Face model folder."),
    ("a path that does not exist", lambda m, g: models.load("./no/such/folder"), "Could not load model './no/such/folder': no such folder on this machine."),
    ("empty prompt", lambda m, g: generate.encode_prompt(m, ""), "The prompt is empty; type something for the model to continue."),
    ("whitespace-only prompt", lambda m, g: generate.encode_prompt(m, " \n\t "), "The prompt is empty; type something for the model to continue."),
    ("max_new_tokens of 0", lambda m, g: generate.generate(m, "Hi", max_new_tokens=0), "max_new_tokens must be between 1 and 4096, got 0."),
    ("absurd max_new_tokens", lambda m, g: generate.generate(m, "Hi", max_new_tokens=10**9), "max_new_tokens must be between 1 and 4096, got 1000000000."),
    ("negative temperature", lambda m, g: generate.generate(m, "Hi", temperature=-1.0), "temperature must be 0 (greedy) or positive, got -1.0."),
    ("top-k larger than the width", lambda m, g: m.topk_k_spec(5000), "top-k needs 1 <= k <= 576 (the narrowest projection input of this model), got k=5000."),
    ("misspelt method", lambda m, g: calibrate.calibrate(m, "cat", 0.5), "Unknown sparsity method 'cat'; choose one of teal, cats, topk, dense."),
    ("empty calibration text", lambda m, g: calibrate.calibrate(m, "teal", 0.3, text="   "), "The text is empty; give some text to calibrate or evaluate on."),
    ("unknown dtype", lambda m, g: models.load(dtype="float8"), "Unknown dtype 'float8'; choose one of float32, bfloat16, float16, int8."),
    ("unknown weight layout", lambda m, g: models.load(layout="rows"), "Unknown weight layout 'rows'; choose one of inputs, cats, hf."),
    ("unknown device", lambda m, g: models.load(device="tpu"), "Unknown device 'tpu'; choose one of auto, cpu, cuda."),
]
if not torch.cuda.is_available():  # this machine, and CI's: no GPU
    CASES.append(("CUDA where there is none", lambda m, g: models.load(device="cuda"),
                  "CUDA was asked for, but torch sees no usable CUDA device on this machine; choose the CPU (or auto, "
                  "which falls back to it)."))


@pytest.mark.parametrize("case, call, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_sentence(smollm2, good, case, call, message):
    with pytest.raises((SpecError, models.ModelLoadError, generate.GenerationError, ValueError)) as info:
        call(smollm2, good)
    text = str(info.value)
    assert message in text and "\n" not in text and "Traceback" not in text
    assert generate.generate(smollm2, "Hi", max_new_tokens=1).tokens  # the shared model still works


@pytest.mark.parametrize("prompt", ["🙂🚀🌍🎉", "Tell me about the sea. " * 2000])
def test_extreme_prompts_work(smollm2, prompt):
    encoded = generate.encode_prompt(smollm2, prompt, max_new_tokens=4)
    assert len(encoded.ids) <= smollm2.context_length - 4
    assert (encoded.truncated > 0) == (len(prompt) > 1000)
    assert len(generate.generate(smollm2, encoded, smollm2.topk_spec(0.3), max_new_tokens=4, stop_at_eos=False).tokens) == 4


@pytest.mark.parametrize("method", ["teal", "topk"])
def test_zero_and_full_sparsity_run(smollm2, method):
    for target in (0.0, 1.0):
        spec = calibrate.calibrate(smollm2, method, target)
        tokens = generate.generate(smollm2, "Hi", spec, max_new_tokens=3, stop_at_eos=False).tokens
        assert len(tokens) == 3
