"""Loading a model (the embedded SmolLM2, any HF id, or a local folder, safetensors only), patching it once
(patch.patch_model) and measuring which dense product is faster on it here.

The embedded default is converted once from the GGUF it ships as (gguf.py); later loads come from the cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from . import bf16_math, quantize
from .machine import available_memory, back_with_huge_pages, machine, synchronize
from .patch import DENSE_ROUTES, ModelLoadError, SparseLinear, check_layout, decoder_layers, patch_model, sparsity
from .spec import GROUPS, SparsitySpec, SpecError
from .store import DiskStore, cache_dir, digest

_ROUTES = DiskStore("dense_routes", 2)  # v2: chosen with q|k|v and gate|up as one call each

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Weight formats: the dtype a model is loaded and computes in; "int8" computes in float32 and stores its projections
# and head as int8 rows (quantize.py).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA where there is a usable device, else the CPU


# ---- the patched model -------------------------------------------------------------------------------
@dataclasses.dataclass
class SparseModel:
    """A causal LM whose projections read each call's spec. Shared read-only between threads after load."""
    model: nn.Module
    tokenizer: object
    name: str
    dtype: torch.dtype
    fingerprint: str
    num_layers: int
    gated: bool
    group_params: tuple[dict[str, int], ...]  # per layer: weight elements read through each group
    group_widths: dict[str, int]             # input width of each group
    layout: str = "inputs"                   # one of patch.LAYOUTS
    dense_route: str = "linear"              # patch.DENSE_ROUTES: the faster dense product here, measured at load
    int8: bool = False                       # projections and head stored as int8 rows (quantize.py)

    @property
    def weights(self) -> str:
        """The weight format, as DTYPES names it: "int8", or the dtype the model computes in."""
        return "int8" if self.int8 else str(self.dtype).removeprefix("torch.")

    @property
    def weight_key(self) -> str:
        """The weight format in measurement keys: the dtype as torch names it, "int8" for int8 rows."""
        return "int8" if self.int8 else str(self.dtype)

    @property
    def element_bytes(self) -> int:
        """Bytes of one projection weight element."""
        return 1 if self.int8 else self.dtype.itemsize

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (the CPU when accelerate offloaded it)."""
        weight = next(self.model.get_input_embeddings().parameters())
        return torch.device("cpu") if weight.device.type == "meta" else weight.device

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))

    def check(self, spec: SparsitySpec | None) -> None:
        """Raise SpecError if `spec` cannot run on this model."""
        if spec is None:
            return
        spec.check_model(self.fingerprint, self.num_layers)
        if spec.method == "cats" and not self.gated:
            raise SpecError("CATS thresholds the gate of a gated MLP (gate/up/down), and this model's MLP is not gated; use TEAL or top-k.")

    def skippable_params(self, method: str) -> tuple[dict[str, int], ...]:
        """Per layer, the weight elements whose reads each group's sparsity saves with this layout; "read_anyway"
        holds the sparsifiable weights it cannot skip. In the cats layout up (half of a gated MLP's input weights)
        moves: an inactive CATS neuron skips its row of up, while TEAL's and top-k's input sparsity saves none of it."""
        if self.layout != "cats" or not self.gated:
            return self.group_params
        if method == "cats":
            return tuple(p | {"mlp_in": p["mlp_in"] // 2, "mlp_mid": p["mlp_mid"] + p["mlp_in"] // 2} for p in self.group_params)
        return tuple(p | {"mlp_in": p["mlp_in"] // 2, "read_anyway": p["mlp_in"] // 2} for p in self.group_params)

    def dense_spec(self) -> SparsitySpec:
        return SparsitySpec.dense(self.num_layers, self.fingerprint)

    def topk_spec(self, sparsity: float) -> SparsitySpec:
        return SparsitySpec.uniform_topk(self.num_layers, self.fingerprint, sparsity)

    def topk_k_spec(self, k: int) -> SparsitySpec:
        """Keep the k largest |x| of every projection input per token (k counted, not a fraction)."""
        narrowest = min(self.group_widths.values())
        if not 1 <= k <= narrowest:
            raise SpecError(f"top-k needs 1 <= k <= {narrowest} (the narrowest projection input of this model), got k={k}.")
        row = [1.0 - k / self.group_widths[g] for g in GROUPS]
        return SparsitySpec.from_tables("topk", [row] * self.num_layers, self.fingerprint, targets=[row] * self.num_layers)


def fingerprint_of(model: nn.Module, name: str) -> str:
    """Short id of architecture + weights, so a spec can refuse a model it was not calibrated for."""
    cfg = model.config
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    embed = model.get_input_embeddings().weight
    if embed.device.type != "meta":  # accelerate may have offloaded it to disk
        digest.update(embed.detach().flatten()[:8192].float().cpu().numpy().tobytes())
    short = Path(name).name or name
    return f"{short}-{digest.hexdigest()[:12]}"


def wrap(model: nn.Module, tokenizer: object, name: str, layout: str = "inputs", int8: bool = False) -> SparseModel:
    model.eval()
    fingerprint = fingerprint_of(model, name)
    num_layers, gated, params, widths = patch_model(model, layout)
    dtype = next(model.parameters()).dtype
    if int8:
        quantize.quantize_model(model)
    patched = SparseModel(model, tokenizer, name, dtype, fingerprint, num_layers, gated, params, widths, layout,
                          int8=int8)
    if dtype == torch.bfloat16:  # its multi-token products in float32 where this CPU's bfloat16 GEMM is slow
        for module in (model, *decoder_layers(model)):
            bf16_math.wrap_forward(module, dtype, patched.device)
    patched.dense_route = choose_dense_route(patched)
    for linear in model.modules():
        if isinstance(linear, SparseLinear):
            linear.dense_route = patched.dense_route
            if linear.shared is not None:
                linear.shared.linear.dense_route = patched.dense_route
    if patched.device.type == "cuda" and layout != "hf":  # Triton autotunes each shape on its first call: now, before
        with torch.inference_mode():                      # anything is timed or captured in a CUDA graph
            _dense_forward_seconds(patched, "kernel", 1)
    return patched


def _dense_forward_seconds(model: SparseModel, route: str, repeats: int) -> list[float]:
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    seconds = []
    for _ in range(repeats):
        with sparsity(None, dense_route=route):
            start = time.perf_counter()
            model.model(ids, use_cache=False)
            synchronize(ids.device)
        seconds.append(time.perf_counter() - start)
    return seconds


def choose_dense_route(model: SparseModel, repeats: int = 5) -> str:
    """The faster way to compute the dense product on this model's stored weights: HF's forward (F.linear) or the
    kernel with nothing skipped, timed interleaved on one-token forward passes. The choice is kept on disk per
    model, dtype, layout and machine, so every process on this machine computes dense the same way."""
    if model.int8:
        return "kernel"  # int8 rows have one route, the int8 op
    if model.layout == "hf" or model.device.type == "meta":
        return "linear"
    key = digest(model.fingerprint, str(model.dtype), model.layout, machine(model.device))
    known = _ROUTES.load(key)
    if known and known.get("route") in DENSE_ROUTES:
        return known["route"]
    with torch.inference_mode():
        for route in DENSE_ROUTES:  # warm-up: the kernel's first call builds it
            _dense_forward_seconds(model, route, 1)
        times = {route: [] for route in DENSE_ROUTES}
        for _ in range(repeats):
            for route in DENSE_ROUTES:
                times[route] += _dense_forward_seconds(model, route, 1)
    medians = {route: statistics.median(t) for route, t in times.items()}
    route = min(medians, key=medians.get)
    _ROUTES.save(key, {"route": route, "median_ms": {r: round(m * 1e3, 4) for r, m in medians.items()}})
    return route



def resolve_device(device: str) -> str:
    """One of DEVICES as the device to load on; CUDA asked for where there is none is refused in one sentence."""
    if device not in DEVICES:
        raise ModelLoadError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was asked for, but torch sees no usable CUDA device on this machine; "
                             "choose the CPU (or auto, which falls back to it).")
    return device


def load(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "auto",
         trust_remote_code: bool = False, layout: str = "inputs", device_map: str | dict | None = None) -> SparseModel:
    """Load and patch a model: the embedded default, a local folder, or a Hugging Face hub id (safetensors only).

    `device_map` ("auto", or accelerate's {module: device} dict) splits a model too big for one device over the
    GPUs, CPU memory and disk (offloaded to the cache); `device` is then ignored and the memory check is
    accelerate's. The patched linears follow their weights wherever accelerate puts them. `device` is one of
    DEVICES (auto: CUDA when there is one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars are noise in a CLI and a server log
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    check_layout(layout)
    device = resolve_device(device)
    if dtype == "int8" and (layout != "inputs" or device != "cpu" or device_map is not None):
        raise ModelLoadError("int8 weights run on the CPU, in the inputs layout, on one device; choose those, or "
                             "float32 or bfloat16 weights.")
    if name in (DEFAULT_MODEL, "default"):
        from .gguf import default_model_dir  # it imports this module's error
        source = str(default_model_dir())
    else:
        source = _resolve(name, ["*.json"])  # the config first: refuse a model that cannot fit before downloading it
        if device_map is None:
            check_fits(source, dtype, trust_remote_code, device=device)
        source = source if Path(name).expanduser().is_dir() else _resolve(name, ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        placement = {} if device_map is None else dict(
            device_map=device_map, offload_folder=str(cache_dir() / "offload" / hashlib.sha256(source.encode()).hexdigest()[:16]))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **placement)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load model {name!r} from {source!r}: {_first_line(err)}") from None
    if device_map is None:
        model.to(device)
    patched = wrap(model, tokenizer, DEFAULT_MODEL if name == "default" else name, layout, int8=dtype == "int8")
    _release_file_mapping(model)
    back_with_huge_pages(model)
    return patched


def _release_file_mapping(model: nn.Module) -> None:
    """safetensors weights arrive memory-mapped from the file. The re-stored projections already own new memory;
    giving the remaining parameters (embeddings, norms, biases) their own copies too lets the mapping go, so the
    process holds exactly one copy of the weights instead of the new projections plus the mapped file."""
    for parameter in model.parameters():
        own = parameter.untyped_storage().nbytes() == parameter.numel() * parameter.element_size()
        if own and parameter.is_contiguous() and parameter.device.type == "cpu":  # not the re-stored projections (transposed
            parameter.data = parameter.data.clone()                             # views) nor views of joint matrices



def estimate_bytes(source: str, dtype: str, trust_remote_code: bool = False) -> int:
    """Weight bytes the model will take, from its config alone (built on the meta device: no memory, no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in skeleton.parameters()) * DTYPES[dtype].itemsize


def check_fits(source: str, dtype: str, trust_remote_code: bool = False, available: int | None = None,
               device: str = "cpu") -> None:
    """Refuse, in one sentence, a model whose weights would not fit in the device's memory (the GPU's, or the
    machine's) instead of swapping the machine or running out of GPU memory half-way."""
    try:
        need = estimate_bytes(source, dtype, trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"Could not read the model config in {source!r}: {_first_line(err)}") from None
    if available is not None:
        free = available
    else:
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else available_memory()
    if need * 1.2 > free:  # weights plus activations, KV cache and the kernels' working set
        where = "GPU memory" if device == "cuda" else "memory"
        raise ModelLoadError(f"This model needs about {need / 2**30:.1f} GiB for its {dtype} weights but only "
                             f"{free / 2**30:.1f} GiB of {where} is free; pick a smaller model or bfloat16.")


def _resolve(name: str, patterns: list[str]) -> str:
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_like_path:
        if not path.is_dir():
            raise ModelLoadError(f"Could not load model {name!r}: no such folder on this machine.")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"Could not load model {name!r}: the folder has no config.json, so it is not a Hugging Face model folder.")
        return str(path)
    from huggingface_hub import snapshot_download
    try:  # fetch only safetensors weights plus config/tokenizer files; never pickles
        return snapshot_download(name, allow_patterns=patterns)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "not reachable / not found"
        raise ModelLoadError(f"Could not find model {name!r}: it is not a local folder and the Hugging Face hub did not provide it ({type(err).__name__}: {_first_line(err)}).") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
