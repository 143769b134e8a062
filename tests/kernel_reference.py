"""The oracle every kernel test shares: float64 F.linear on the masked input, a scaled tolerance check, and the
weight layout a patched model hands the kernels."""
import torch
import torch.nn.functional as F
from torch import nn

from sparse_core import patch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def input_rows_weight(out, width, dtype, generator=None):
    """A random (out, in) weight stored as (in, out) rows, the layout a patched model gives the kernels."""
    return (torch.randn(width, out, generator=generator) / width ** 0.5).to(dtype).t()


def reference(x, weight, bias, threshold):
    """The mask is taken in x's own dtype, as the operator defines; the product in float64."""
    keep = x.abs() > threshold
    return F.linear((x * keep).double(), weight.double(), None if bias is None else bias.double())


def check(y, expected, dtype):
    scale = expected.abs().max().item() + 1.0
    assert not y.isnan().any()
    assert (y.double() - expected).abs().max().item() <= TOLERANCE[dtype] * scale


def in_kernel_layout(model, layout="inputs"):
    """Every nn.Linear of an unpatched HF model's decoder blocks re-stored as (in, out) rows (in the cats layout
    up_proj keeps its rows), patching nothing: HF's own forward on the storage a patched model uses."""
    for block in patch.decoder_layers(model):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and not (layout == "cats" and name.endswith("up_proj")):
                patch.adopt_input_rows(module)
    return model
