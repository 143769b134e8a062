"""A gpt-fast-style decoder for Llama-family models: the model's own weights, a static KV cache, and the one-token
step as a plain function that torch.compile can take whole (inductor on the CPU, CUDA graphs on a GPU).

Why: HF's forward costs Python and module overhead on every token (cache objects, seven projection modules per
layer), and under torch.compile it breaks the graph at every layer's cache update. Here the sparsity
setting is not a context variable but tensors passed to the step: per (layer, group) thresholds, top-k keep counts
and CATS' gate thresholds. So one compiled step serves every spec, each call carries its own, and threads never
share one. Every projection goes through the same registered op as the patched model (sparse_lab::sparse_linear,
which has a fake implementation for the compiler), q|k|v and gate|up as one call each (patch.SharedInput).

On the CPU nothing is compiled: one native call a token, sparse_lab::decode_token, runs every layer and the head
with the same weights, thresholds and caches, for every method (dense, TEAL, top-k's per-token ranking, CATS' gate)
of a model without projection biases: the compiled step's per-token wrapper, dynamo's guards and inductor's many
small parallel kernels a layer cost more than the glue itself (docs/PERFORMANCE.md has the measurements), and a
first compile takes minutes on a laptop's cores, on the path of whoever clicks first. A model the native step does
not take decodes through HF's forward on the CPU. torch.compile runs on GPUs (COMPILED_DEVICES).

Supported: the Llama family as transformers builds it (llama, mistral, qwen2: RMSNorm, rotary embeddings, grouped
KV heads, gated SiLU MLP) in the inputs layout; anything else decodes through HF's forward, and `unsupported` says
why. The step counts the inputs it skips, which is all a SparsityCounter needs; observers that need every score
(histograms, traces) decode through HF's forward.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import types
import weakref

import torch
import torch.nn.functional as F

from . import bf16_math, kernels, ops
from .prefill import chunked
from .kernels import cpu_native
from .machine import machine
from .models import SparseModel
from .patch import decoder_layers
from .spec import GROUPS, SparsitySpec
from .store import DiskStore, cache_dir, digest

# Inductor's compiled code goes to the lab's cache folder (unless the user chose one), so a compile is paid once per
# machine: set at import, before anything asks inductor where its cache is (it fixes the folder on first use).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))

FAMILIES = ("llama", "mistral", "qwen2")
# The KV cache holds a power of two of positions, CACHE_BUCKET at least: one compiled shape per bucket. Each variant's
# step is its own code object (Decoder.step_function), and torch.compile counts recompiles per code object, so one
# step holds at most log2(MAX_COMPILED_POSITIONS / CACHE_BUCKET) + 1 = 6 shapes, below dynamo's recompile limit (8).
# Longer generations decode uncompiled (attention over the context dominates them anyway).
CACHE_BUCKET = 256
MAX_COMPILED_POSITIONS = 8192
_COMPILE_SECONDS = DiskStore("compile_seconds", 1)
COMPILED_DEVICES = ("cuda",)  # where the step is compiled; elsewhere only the native step runs
_ATTN_IN, _ATTN_OUT, _MLP_IN, _MLP_MID = (GROUPS.index(g) for g in ("attn_in", "attn_out", "mlp_in", "mlp_mid"))


def unsupported(model: SparseModel) -> str | None:
    """Why this model cannot use the fast decoder (one sentence), or None when it can."""
    config = model.model.config
    if config.model_type not in FAMILIES:
        return f"the fast decoder covers {', '.join(FAMILIES)}, not {config.model_type}"
    if model.layout != "inputs":
        return f"the fast decoder runs the inputs layout, not {model.layout}"
    kernel_dtypes = kernels.KERNEL_DTYPES.get(model.device.type, ())
    if model.dtype not in kernel_dtypes:
        return f"the kernels on {model.device.type} take {', '.join(str(d)[6:] for d in kernel_dtypes)}, not {str(model.dtype)[6:]}"
    if model.device.type == "cuda" and not kernels.triton_loaded():
        return "the fast decoder runs the Triton kernels on a GPU, and Triton is not installed"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the fast decoder's MLP is SiLU-gated, this model's is {config.hidden_act}"
    if model.device.type == "meta" or any(getattr(m, "_hf_hook", None) for m in model.model.modules()):
        return "the model is split by accelerate (device_map); the fast decoder needs it on one device"
    if not all(b.self_attn.q_proj.shared is not None and b.mlp.gate_proj.shared is not None for b in decoder_layers(model.model)):
        return "q|k|v or gate|up are not stored as one matrix in this model"
    return None


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """A spec as the step's inputs. `method` and `linear` pick the compiled variant (dense through F.linear, or
    through the sparse op with `thresholds`). The tensors: `thresholds` [layers, groups] for each group's input (0
    keeps every non-zero input); `keep_counts` [layers, groups], top-k's inputs kept per token; `gate` [layers], CATS'
    threshold on |act(gate)|."""
    method: str
    linear: bool
    thresholds: torch.Tensor
    keep_counts: torch.Tensor
    gate: torch.Tensor

    @property
    def variant(self) -> tuple[str, bool]:
        return _variant(self.method, self.linear)


def _variant(method: str, linear: bool) -> tuple[str, bool]:
    """Which compiled step a method runs: TEAL's is dense's (the same graph with other numbers)."""
    return ("dense" if method == "teal" else method), linear


class Decoder:
    """The fast decoder of one patched model: its weights (views, no copies) and its compiled steps."""

    def __init__(self, model: SparseModel):
        if model.device.type == "cpu":
            cpu_native.native()  # the op's CPU implementation: the C++ kernel, built once, or its fallback
        self.model = model
        config = model.model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.blocks = list(decoder_layers(model.model))
        inner = model.model.model
        self.embedding, self.norm, self.rotary = inner.embed_tokens, inner.norm.weight, inner.rotary_emb
        self.int8 = model.int8  # int8 rows (quantize.py): every product through the int8 op, the head too
        head = model.model.lm_head
        self.head = head.q if self.int8 else head.weight
        # The lm_head is the largest matrix (tied: the embedding's rows); on the CPU a dot-product GEMV over its (out, in)
        # rows reads it at the kernels' rate, where MKL's GEMV does not (docs/PERFORMANCE.md).
        native_head = model.device.type == "cpu" and cpu_native.native()
        if self.int8:  # the op itself: the compiled step traces no Python around it
            self._head = lambda h, q: torch.ops.sparse_lab.sparse_linear_int8.default(h, q, head.scales, None, None, 0.0)
        else:
            self._head = torch.ops.sparse_lab.dot_linear.default if native_head else F.linear
        self.widths = torch.tensor([model.group_widths[g] for g in GROUPS])
        self._scales: list[torch.Tensor] = []  # the native step's int8 scales (none for float weights)
        self._native = self._native_weights() if native_head else None
        self._rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None  # the native step's cos and sin rows
        self.profile = None  # a token_profile.TokenProfile while `bench profile` times the native step's phases
        self._compiled: dict[tuple, object] = {}
        self.shapes_run: set[str] = set()  # compile keys this process has run compiled: those steps start at once
        self.failed: dict[str, str] = {}  # compile key -> why its compile failed: that shape then decodes eagerly
        self._lock = threading.Lock()
        self._compiling: dict[str, threading.Lock] = {}  # one compile of a shape at a time; a second caller waits

    # ---- the spec as tensors ----------------------------------------------------------------------
    def step_inputs(self, spec: SparsitySpec | None, dense_route: str | None = None) -> StepInputs:
        """The step's inputs for `spec` (None: dense, by `dense_route` or the model's measured one). Thresholds are
        rounded to the model's dtype as the kernel rounds a float threshold, so both decoders compare alike."""
        layers, device, dtype = self.model.num_layers, self.model.device, self.model.dtype
        thresholds = torch.zeros(layers, len(GROUPS))
        keep = torch.zeros(layers, len(GROUPS), dtype=torch.long)
        gate = torch.zeros(layers)
        method = "dense" if spec is None else spec.method
        if method in ("teal", "cats", "topk"):
            values = torch.tensor(spec.values, dtype=torch.float64)
            if method == "teal":
                thresholds = values.float()
            elif method == "cats":
                gate = values[:, _MLP_MID].float()
            else:
                keep = ops.keep_count(values, self.widths)
        as_dtype = lambda t: kernels.comparable(t.float(), dtype).to(device)
        return StepInputs(method, self._linear(spec, dense_route), as_dtype(thresholds), keep.to(device), as_dtype(gate))

    def variant(self, spec: SparsitySpec | None, dense_route: str | None = None) -> tuple[str, bool]:
        """The step variant a stream of this spec runs (StepInputs.variant, without building the inputs)."""
        return _variant("dense" if spec is None else spec.method, self._linear(spec, dense_route))

    def _linear(self, spec: SparsitySpec | None, dense_route: str | None) -> bool:
        """True when the step computes dense products with F.linear: a dense spec on the "linear" route, asked for
        (the benchmarks time both) or else the model's, which is measured on HF's forward. Where the native step
        runs, dense takes it instead: it decoded 1.3-3 x faster than the compiled F.linear step on every CPU and
        dtype measured, also where F.linear wins HF's forward (docs/PERFORMANCE.md)."""
        if spec is not None and spec.method != "dense":
            return False
        return (dense_route or ("kernel" if self._native is not None else self.model.dense_route)) == "linear"

    def shape_key(self, spec: SparsitySpec | None, max_positions: int, dense_route: str | None = None) -> str:
        """What a compiled step's shape is known by: the model, its dtype, this machine, the variant, the cache length."""
        variant = self.variant(spec, dense_route)
        return digest(self.model.fingerprint, self.model.weight_key, machine(self.model.device), variant,
                      cache_length(max_positions), torch.__version__)

    # ---- one layer, any number of tokens ----------------------------------------------------------
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _threshold(self, x: torch.Tensor, inputs: StepInputs, layer: int, group: int) -> torch.Tensor:
        """One value, or top-k's one per token: the largest value below each token's k-th largest |x|."""
        if inputs.method != "topk":
            return inputs.thresholds[layer, group].reshape(1)
        return ops.topk_threshold(x, inputs.keep_counts[layer, group]).reshape(-1, 1)

    def _project(self, x, linear, inputs: StepInputs, layer: int, group: int, skipped: list, count: bool = True):
        """A projection (or a joint one) through the sparse op, or dense through F.linear; appends to `skipped`
        how many of its inputs the threshold drops, as a SparsityCounter would have counted them."""
        threshold = self._threshold(x, inputs, layer, group)
        if count:
            skipped.append((x.abs() <= threshold.reshape(-1, 1)).sum())
        if linear.int8:  # one route: the int8 rows through the op
            inner = linear.inner
            return torch.ops.sparse_lab.sparse_linear_int8(x, inner.q, inner.scales, inner.bias, threshold, 0.0)
        weight, bias = linear.weight, linear.bias
        if inputs.linear:
            return F.linear(x, weight, bias)
        return torch.ops.sparse_lab.sparse_linear(x, weight, weight.t(), bias, threshold, 0.0)

    def _layer(self, x, index: int, cos, sin, positions, mask, caches, inputs: StepInputs, skipped: list):
        block = self.blocks[index]
        tokens = x.shape[0]
        h = self._rms(x, block.input_layernorm.weight)
        attn = block.self_attn
        qkv = self._project(h, attn.q_proj.shared.linear, inputs, index, _ATTN_IN, skipped)
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(tokens, self.heads, self.head_dim).transpose(0, 1)
        k = k.view(tokens, self.kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(tokens, self.kv_heads, self.head_dim).transpose(0, 1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k_cache, v_cache = caches[2 * index], caches[2 * index + 1]
        k_cache.index_copy_(1, positions, k)
        v_cache.index_copy_(1, positions, v)
        filled = mask.shape[1]
        out = self._attend(q, k_cache[:, :filled], v_cache[:, :filled], mask)
        out = out.transpose(0, 1).reshape(tokens, self.heads * self.head_dim)
        x = x + self._project(out, attn.o_proj, inputs, index, _ATTN_OUT, skipped)

        h = self._rms(x, block.post_attention_layernorm.weight)
        mlp = block.mlp
        gate, up = self._project(h, mlp.gate_proj.shared.linear, inputs, index, _MLP_IN, skipped).chunk(2, dim=-1)
        active = F.silu(gate)
        if inputs.method == "cats":  # neurons whose |act(gate)| is at most the threshold are skipped, and counted
            keep = active.abs() > inputs.gate[index]
            skipped.append((~keep).sum())
            up = up * keep
        return x + self._project(active * up, mlp.down_proj, inputs, index, _MLP_MID, skipped,
                                 count=inputs.method != "cats")

    def _attend(self, q, k_cache, v_cache, mask):
        """Attention of the T queries [heads, T, head_dim] over the whole cache, masked, as two float32 batched
        matmuls and a softmax that inductor fuses: at one query SDPA's CPU kernel costs ~0.2 ms a layer (a quarter of
        a bfloat16 step, docs/PERFORMANCE.md). Query heads are grouped by the KV head they share (HF's repeat_kv)."""
        heads, tokens, _ = q.shape
        group = heads // self.kv_heads
        grouped = q.float().reshape(self.kv_heads, group * tokens, self.head_dim)
        scores = torch.bmm(grouped, k_cache.float().transpose(1, 2)) * self.head_dim ** -0.5
        scores = scores.view(self.kv_heads, group, tokens, -1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).view(self.kv_heads, group * tokens, -1)
        return torch.bmm(weights, v_cache.float()).view(heads, tokens, self.head_dim).to(q.dtype)

    def forward(self, ids: torch.Tensor, start: torch.Tensor, caches, inputs: StepInputs):
        """(logits of the last of `ids`, inputs skipped per [layer, group] over the T tokens) for T tokens at positions
        start..start+T-1, filling the caches. `start` is a one-element tensor, so the compiled step's graph does not
        change with the position."""
        tokens, length = ids.shape[0], caches[0].shape[1]
        if not torch.compiler.is_compiling():  # eager (a prefill pass): attend over the filled positions only, not
            length = int(start) + tokens       # the whole cache (a long prompt's passes would cost 3-4x in attention)
        positions = start + torch.arange(tokens, device=ids.device)
        cos, sin = self._rotary(positions, self.model.dtype)
        mask = torch.arange(length, device=ids.device)[None, :] <= positions[:, None]
        x, skipped = self.embedding(ids), []
        for index in range(len(self.blocks)):
            x = self._layer(x, index, cos, sin, positions, mask, caches, inputs, skipped)
        logits = self._head(self._rms(x[-1:], self.norm), self.head)[0]
        return logits, torch.stack(skipped).view(len(self.blocks), len(GROUPS))

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin at these positions, as the model's own rotary embedding computes them (its scaling types too)."""
        cos, sin = self.rotary(torch.empty(0, dtype=dtype, device=positions.device), positions[None])
        return cos, sin  # [1, T, head_dim]: broadcast over the heads of [heads, T, head_dim]

    # ---- the native one-token step (CPU, every method) --------------------------------------------
    def _native_weights(self) -> tuple | None:
        """The (in, out) rows and norms sparse_lab::decode_token reads (views, no copies), or None where the model
        has biases in its projections (Qwen2's q|k|v), which that step does not add."""
        blocks = self.blocks
        linears = [(b.self_attn.q_proj.shared.linear, b.self_attn.o_proj, b.mlp.gate_proj.shared.linear, b.mlp.down_proj)
                   for b in blocks]
        if any(linear.bias is not None for group in linears for linear in group):
            return None
        if self.int8:
            rows = [[group[i].inner.q for group in linears] for i in range(4)]
            self._scales = [linear.inner.scales for group in linears for linear in group] + [self.model.model.lm_head.scales]
        else:
            rows = [[group[i].weight.t() for group in linears] for i in range(4)]
        norms = [w for b in blocks for w in (b.input_layernorm.weight, b.post_attention_layernorm.weight)]
        return (*rows, norms)

    def runs_native(self, variant: tuple[str, bool]) -> bool:
        """True when this variant's step is the native one (nothing to compile): every method through the kernel on
        the CPU (not the F.linear dense route), for a model without projection biases."""
        return self._native is not None and not variant[1]

    def covers(self, variant: tuple[str, bool]) -> bool:
        """True when a stream of this variant decodes here: natively, or compiled where the device compiles."""
        return self.runs_native(variant) or self.model.device.type in COMPILED_DEVICES

    def native_forward(self, ids: torch.Tensor, start: torch.Tensor, caches, inputs: StepInputs):
        """`forward` for one token in one native call (sparse_lab::decode_token): what the compiled step computes,
        without its per-token wrapper, guards and small kernels."""
        position = int(start)
        cos, sin = self._rotary_at(position)
        profile = self.profile
        logits, skipped = torch.ops.sparse_lab.decode_token(
            self.embedding(ids[:1])[0], cos, sin, position, *self._native, caches, inputs.thresholds,
            inputs.keep_counts if inputs.method == "topk" else None, inputs.gate if inputs.method == "cats" else None,
            self.norm, self.head, self.heads, self.kv_heads, self.eps, self._scales,
            None if profile is None else profile.phases)
        if profile is not None:
            profile.count(skipped)
        return logits, skipped

    def native_row_bytes(self) -> list[list[tuple[int, int]]]:
        """Per group (q|k|v, o, gate|up, down), each layer's (inputs, bytes of one input's row) in the native step."""
        return [[(w.shape[0], w.shape[1] * w.element_size()) for w in group] for group in self._native[:4]]

    def _rotary_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at one position, rows of a table the model's rotary embedding fills once per doubling of the
        positions seen, not once a token; never past the model's trained positions, where a dynamic scaling would
        compute the table's rows from its length."""
        table = self._rotary_table
        if table is None or position >= table[0].shape[0]:
            trained = getattr(self.model.model.config, "max_position_embeddings", 0)
            rows = max(position + 1, min(max(256, 2 * position), trained))
            cos, sin = self._rotary(torch.arange(rows), self.model.dtype)
            table = self._rotary_table = (cos[0], sin[0])
        return table[0][position], table[1][position]

    # ---- compiled one-token step ------------------------------------------------------------------
    def step_function(self, variant: tuple[str, bool]):
        """The one-token step of one variant (StepInputs.variant): the native step where it runs (runs_native), else
        compiled once per process; each cache length is then its own shape, and inductor keeps the compiled code on
        disk. Compiled from a copy of `forward` with its own code object: dynamo keeps its compiled entries, and
        counts them against its recompile limit, per code object, so variants, dtypes and models never add up to
        that limit."""
        if self.runs_native(variant):
            return self.native_forward
        with self._lock:
            if variant not in self._compiled:
                cuda = self.model.device.type == "cuda"
                self._compiled[variant] = torch.compile(_own_code(self.forward), fullgraph=True, dynamic=False,
                                                        mode="reduce-overhead" if cuda else None)
            return self._compiled[variant]

    def compiling(self, key: str) -> threading.Lock:
        """Held while the step of compile key `key` compiles: a second caller waits for the first compile."""
        with self._lock:
            return self._compiling.setdefault(key, threading.Lock())

    def why_eager(self, key: str, length: int, variant: tuple[str, bool]) -> str | None:
        """Why a compiled session of this shape decodes uncompiled from the start (one sentence), or None."""
        if self.runs_native(variant):
            return None
        if not self.covers(variant):
            return (f"The step is compiled on {' and '.join(COMPILED_DEVICES)} only, and the native step does not run "
                    "this variant, so it decodes uncompiled.")
        if length > MAX_COMPILED_POSITIONS:
            return (f"This generation needs a {length:,}-position cache, more than the {MAX_COMPILED_POSITIONS:,} the "
                    "compiled step is built for, so it decodes uncompiled.")
        if key in self.failed:
            return f"This step's compile failed earlier ({self.failed[key]}), so it decodes uncompiled."
        return None


def _own_code(method):
    """`method` as a new function on a copy of its code object (same behaviour, a code object of its own)."""
    function = method.__func__
    fresh = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                               function.__defaults__, function.__closure__)
    return types.MethodType(fresh, method.__self__)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_DECODERS: "weakref.WeakKeyDictionary[object, Decoder]" = weakref.WeakKeyDictionary()


def decoder(model: SparseModel) -> Decoder | None:
    """The model's fast decoder (built once), or None where `unsupported(model)` says why not."""
    if unsupported(model) is not None:
        return None
    found = _DECODERS.get(model.model)
    if found is None:
        found = _DECODERS.setdefault(model.model, Decoder(model))
    return found


def covering(model: SparseModel, spec: SparsitySpec | None, dense_route: str | None = None) -> Decoder | None:
    """The fast decoder that decodes this spec's streams, or None where they go through HF's forward: a model it
    does not take, or on the CPU a variant the native step does not run (the F.linear dense route, projection
    biases, no C++ compiler)."""
    fast = decoder(model)
    return fast if fast is not None and fast.covers(fast.variant(spec, dense_route)) else None


def why_not_covered(model: SparseModel) -> str | None:
    """Why the fast decoder does not decode this model's streams (one clause), or None where it does."""
    why = unsupported(model)
    if why is None and covering(model, None) is None:
        missing = ("does not add projection biases" if cpu_native.native() else
                   f"needs the C++ kernel, which is not built here ({cpu_native.native_failure()})")
        why = f"on the CPU only the native step decodes (nothing compiles there), and it {missing}"
    return why


def step_name(model: SparseModel, spec: SparsitySpec | None) -> str:
    """What runs this spec's decode steps when a stream asks for the fast decoder: the "native step" (the CPU's),
    the "compiled step" (a GPU's), or "HF forward" where neither covers it."""
    fast = covering(model, spec)
    if fast is None:
        return "HF forward"
    return "native step" if fast.runs_native(fast.variant(spec)) else "compiled step"


def compile_by_default(model: SparseModel) -> bool:
    """The fast decoder is on where it covers the model's dense decode (it won on every setting measured:
    docs/PERFORMANCE.md), unless SPARSE_LAB_COMPILE=0."""
    return os.environ.get("SPARSE_LAB_COMPILE", "1") != "0" and covering(model, None) is not None


def compiles(model: SparseModel) -> bool:
    """True when this model's streams compile their steps (on a GPU, the fast decoder on): the compiles a
    preparation can do ahead of a visitor. On the CPU nothing compiles."""
    return compile_by_default(model) and model.device.type in COMPILED_DEVICES


def observable(observers) -> bool:
    """True when the fast decoder can serve these observers: none, or only SparsityCounters (it counts for them)."""
    from .trace import SparsityCounter
    return all(type(observer) is SparsityCounter for observer in observers)


def cache_length(max_positions: int) -> int:
    """The KV cache's positions: the power of two that holds `max_positions`, CACHE_BUCKET at least."""
    return max(CACHE_BUCKET, 1 << (max(max_positions, 1) - 1).bit_length())


class Session:
    """One generation on the fast decoder: its own static KV cache, the prompt's prefill (eager: its length varies;
    dense, through F.linear, unless `sparse_prefill`), then one compiled step per token. Counters among `observers`
    receive what each decode step skipped (the prefill is not counted). A compiled session
    that cannot compile, or whose compiled step fails (a compiler error, a compile limit), decodes eagerly from there
    on: `compiled` then says False and `note` says why in one sentence; other sessions are not affected."""

    def __init__(self, fast: Decoder, spec: SparsitySpec | None, max_positions: int, compiled: bool = True,
                 dense_route: str | None = None, observers=(), sparse_prefill: bool = False):
        model = fast.model
        self.fast, self.observers = fast, tuple(observers)
        self.device = model.device  # read once: the model finds it through its modules
        length = cache_length(max_positions)
        shape = (fast.kv_heads, length, fast.head_dim)  # one tensor per layer and K/V: each updated in place
        with torch.inference_mode():  # like every tensor the steps see: the compiled graph is specialised on it
            self.caches = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(2 * model.num_layers)]
        self.inputs = fast.step_inputs(spec, dense_route)
        self.prefill_inputs = self.inputs if sparse_prefill else fast.step_inputs(None, "linear")
        self._key = fast.shape_key(spec, max_positions, dense_route)
        self.note = fast.why_eager(self._key, length, self.inputs.variant) if compiled else None
        self.failure: str | None = None  # the compiled step's error, when it failed in this session
        self.compiled = compiled and self.note is None
        self._step = fast.step_function(self.inputs.variant) if self.compiled else fast.forward
        self.position = 0

    @torch.inference_mode()
    def prefill(self, ids: list[int], progress=None) -> torch.Tensor:
        """The prompt's logits (eager: its length varies), prefill.PREFILL_CHUNK tokens a pass, `progress(done,
        total)` after each. Compiles the step first where this process has not run its shape yet, so the compile is
        paid here, before any decode step is timed."""
        if not self.ready:
            self.compile()
        return chunked(ids, self._prefill_pass, progress)

    def _prefill_pass(self, ids: list[int]) -> torch.Tensor:
        tokens = torch.tensor(ids, device=self.device)
        start = torch.tensor([self.position], device=tokens.device)
        with bf16_math.float32_products(self.fast.model.dtype, self.device):
            logits, _ = self.fast.forward(tokens, start, self.caches, self.prefill_inputs)
        self.position += len(ids)
        return logits

    @torch.inference_mode()
    def compile(self) -> None:
        """One compiled step at position 0 of this session's caches (the prefill then writes over it): a compile, or a
        load from inductor's cache, one caller at a time per shape. The first compile on this machine is kept on
        record; a failed one is kept on the decoder, so later sessions of this shape decode eagerly at once."""
        with self.fast.compiling(self._key):
            if self._key in self.fast.failed:  # another caller's compile of this shape failed meanwhile
                self._go_eager(self.fast.why_eager(self._key, self.caches[0].shape[1], self.inputs.variant))
            if self.ready:  # or compiled it meanwhile
                return
            began = time.perf_counter()
            device = self.device  # two tensors: one passed twice would compile an aliased variant
            self._run(torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
            if self.failure:
                self.fast.failed[self._key] = self.failure
                return
            self.fast.shapes_run.add(self._key)
            if _COMPILE_SECONDS.load(self._key) is None:
                _COMPILE_SECONDS.save(self._key, {"seconds": round(time.perf_counter() - began, 2)})

    def _run(self, ids: torch.Tensor, start: torch.Tensor):
        """The step, compiled while it works; after a failure eager, for the rest of this session."""
        if self.compiled:
            try:
                return self._step(ids, start, self.caches, self.inputs)
            except Exception as err:  # noqa: BLE001 - no compiler, a refused op, a compile limit: all mean eager
                text = str(err).strip().splitlines()
                self.failure = f"{type(err).__name__}: {text[0][:160] if text else ''}"
                self._go_eager(f"The compiled step failed ({self.failure}), so this generation decodes uncompiled.")
        return self.fast.forward(ids, start, self.caches, self.inputs)

    def _go_eager(self, note: str) -> None:
        """Decode eagerly from here on, saying why."""
        self.compiled, self._step, self.note = False, self.fast.forward, note

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """The next token's logits."""
        ids, start = torch.tensor([token], device=self.device), torch.tensor([self.position], device=self.device)
        return self._report(*self._run(ids, start))

    def _report(self, logits: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
        """A decode step's logits, after handing its skip counts to the counters."""
        self.position += 1
        if self.observers:
            widths = self.fast.widths.tolist()
            for layer, row in enumerate(skipped.tolist()):
                for group, count, width in zip(GROUPS, row, widths):
                    for counter in self.observers:
                        counter.add(layer, group, count, width)
        return logits

    @property
    def ready(self) -> bool:
        """True when the first step will not wait for a compile: its shape already ran compiled in this process, or
        this session decodes eagerly."""
        return not self.compiled or self._key in self.fast.shapes_run or self.fast.runs_native(self.inputs.variant)


def compile_estimate(seconds_on_record: list[float | None]) -> str:
    """How long compiling these steps will take, as every wait for a compile says it: their first compiles on this
    machine when all are on record (a later one loads from the cache in seconds), else the usual first time."""
    if seconds_on_record and all(seconds is not None for seconds in seconds_on_record):
        return (f"the first compile took {sum(seconds_on_record):.0f} s on this machine; from the cache it takes "
                "seconds")
    return "the first time on this machine this takes a minute or two per step"


def compile_seconds_on_record(fast: Decoder, spec: SparsitySpec | None, max_positions: int,
                              dense_route: str | None = None) -> float | None:
    """How long this spec's step shape took to compile the first time on this machine, if it ever has."""
    known = _COMPILE_SECONDS.load(fast.shape_key(spec, max_positions, dense_route))
    return known["seconds"] if known else None


def prepare(model: SparseModel, spec: SparsitySpec | None, max_positions: int, dense_route: str | None = None) -> str | None:
    """Compile (or load from the cache) now the step `generate.stream(..., compiled=True)` will run for this spec;
    None when it is ready compiled, else why that stream will decode uncompiled (one sentence)."""
    fast = decoder(model)
    if fast is None:
        return f"The compiled step does not cover this model: {unsupported(model)}."
    session = Session(fast, spec, max_positions, True, dense_route)
    if not session.ready:
        session.compile()
    return session.note


def ready(model: SparseModel, spec: SparsitySpec | None, max_positions: int, dense_route: str | None = None) -> bool:
    """True when a compiled stream of this spec starts at once: its step ran in this process, or none is compiled."""
    fast = decoder(model)
    if fast is None:
        return True
    key = fast.shape_key(spec, max_positions, dense_route)
    variant = fast.variant(spec, dense_route)
    return (key in fast.shapes_run or fast.runs_native(variant)
            or fast.why_eager(key, cache_length(max_positions), variant) is not None)
