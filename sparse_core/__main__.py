"""Command line: python -m sparse_core info | prepare | generate | calibrate | eval | sweep | bench | selfcheck
(see --help of each)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import lab, metrics, models, patch, peer
from .bench import progress_bar
from .generate import Generation
from .lab import Lab
from .spec import METHODS, SparsitySpec, SpecError


def _model_args(p: argparse.ArgumentParser, sparse: bool = True) -> None:
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="embedded default, a HF hub id or a local folder")
    p.add_argument("--dtype", default="float32", choices=list(models.DTYPES))
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument("--layout", default="inputs", choices=patch.LAYOUTS,
                   help="how the one copy of the weights is stored: inputs (TEAL/top-k skip reads in every projection), "
                        "cats (up_proj keeps its rows, so CATS skips them too) or hf (HF's own storage: bit-identical "
                        "to plain HF, no kernels)")
    add_device_argument(p)
    p.add_argument("--device-map", choices=["auto", "balanced", "sequential"],
                   help="split a model too big for one device over GPUs, CPU memory and disk (accelerate)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if sparse:
        p.add_argument("--method", default="teal", choices=METHODS)
        p.add_argument("--sparsity", type=float, default=0.5, help="model-wide target, 0..1")
        p.add_argument("--spec", type=Path, help="a spec JSON file (overrides --method/--sparsity)")
        p.add_argument("--text", type=Path, help="your own calibration/evaluation text file")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=models.DEVICES,
                   help="where the model runs: auto (CUDA when there is a device, else the CPU), cpu or cuda")


def _text(args) -> str | None:
    return args.text.read_text(encoding="utf-8") if getattr(args, "text", None) else None


def _spec(args, held: Lab) -> SparsitySpec:
    """--spec's file, else --method at --sparsity, calibrated (on --text for `calibrate`, with --allocation)."""
    if args.spec:
        return SparsitySpec.from_json(args.spec.read_text(encoding="utf-8"))
    allocation = getattr(args, "allocation", "uniform")
    return held.calibrate(args.method, args.sparsity, text=_text(args) if args.command == "calibrate" else None,
                          allocation=allocation,
                          progress=progress_bar("allocating" if allocation == "greedy" else "calibrating"))


def cmd_info(args, held: Lab):
    info = held.info()
    print(json.dumps(info, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))


def cmd_generate(args, held: Lab):
    prompt = held.prompt(args.prompt, chat=not args.no_chat, max_new_tokens=args.max_new_tokens)
    spec = _spec(args, held)
    tokens = []
    compiled = held.compiles_by_default if args.compile is None else args.compile
    if compiled and held.why_not_compiled:
        print(f"note: decoding with HF's forward: {held.why_not_compiled}.", file=sys.stderr)
    for token in held.stream(prompt, spec, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             seed=args.seed, compiled=compiled, sparse_prefill=args.sparse_prefill):
        tokens.append(token)
        if token.note:
            print(f"\nnote: {token.note}", file=sys.stderr)
        if not args.json:
            print(token.text, end="", flush=True)
    result = Generation("".join(t.text for t in tokens), tokens)
    if args.json:
        print(json.dumps({"method": spec.method, "sparsity": args.sparsity, "sparse_prefill": args.sparse_prefill,
                          "text": result.text, "new_tokens": len(tokens), "tok_s": round(result.tokens_per_second, 2)}))
    else:
        print(f"\n[{len(tokens)} tokens, {result.tokens_per_second:.1f} tok/s, {spec.method}]", file=sys.stderr)


def cmd_calibrate(args, held: Lab):
    spec = _spec(args, held)
    if args.out:
        args.out.write_text(spec.to_json(), encoding="utf-8")
    print(spec.to_json() if args.json or not args.out else f"wrote {args.out} ({spec.method}, {spec.num_layers} layers)")


def cmd_eval(args, held: Lab):
    spec = _spec(args, held)
    result = held.quality(spec, text=_text(args), max_tokens=args.max_tokens, protocol=args.protocol,
                          progress=progress_bar("evaluating"))
    row = {"model": held.model.name, "method": spec.method, "target": args.sparsity if not args.spec else None,
           "spec": spec.label, "dtype": held.dtype, "layout": held.model.layout,
           "device": str(held.model.device), "ppl_increase": round(result.ppl_increase, 4),
           **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.as_dict().items()},
           "protocol_label": result.protocol_label}
    row["per_layer_sparsity"] = [round(v, 3) for v in result.per_layer_sparsity]
    row["chunk_ppl_increase"] = [round(v, 4) for v in result.chunk_ppl_increase]
    print(json.dumps(row) if args.json else "\n".join(f"{k}: {v}" for k, v in row.items()))


def cmd_sweep(args, held: Lab):
    frame = held.sweep(args.methods, args.targets, args.allocations, text=_text(args), max_tokens=args.max_tokens,
                       protocol=args.protocol, progress=progress_bar("sweeping"))
    if args.json:
        print(json.dumps({"model": held.model.name, "rows": frame.round(4).to_dict(orient="records")}))
    else:
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def cmd_prepare(args, held: Lab):
    """The settings one click away from the app's first page, calibrated and measured before anyone visits: each
    method at --sparsity (the sidebar's default), its quality stored for every page. Seconds when already done."""
    for method in ("teal", "cats", "topk"):
        if method == "cats" and not held.model.gated:
            continue
        spec = held.spec_for(method, args.sparsity, progress=progress_bar(f"calibrating {method} {args.sparsity:.0%}"))
        held.quality(spec, progress=progress_bar(f"measuring {method} {args.sparsity:.0%}"))
    print(f"prepared {held.model.name}: TEAL, CATS and top-k at {args.sparsity:.0%}, calibrated and measured",
          file=sys.stderr)


def _quality_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default=metrics.DEFAULT_PROTOCOL, choices=list(metrics.PROTOCOLS),
                   help="dense-prefill (default, TEAL's: each window's first half dense, its second half sparse and "
                        "scored, as the lab generates) or all-sparse (every position sparse and scored)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="held-out tokens (default: the protocol's own, the one measurement every page shows)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparse_core", description="Training-free activation sparsity lab.")
    sub = parser.add_subparsers(dest="command", required=True)
    _model_args(sub.add_parser("info", help="describe the model and the active kernel backend"), sparse=False)
    p = sub.add_parser("prepare", help="calibrate and measure the app's default settings before the first visitor")
    _model_args(p, sparse=False)
    p.add_argument("--sparsity", type=float, default=0.25, help="the sidebar's default target")
    p = sub.add_parser("generate", help="generate text dense or sparse")
    _model_args(p)
    p.add_argument("--prompt", default="Write a haiku about the sea.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--sparse-prefill", action="store_true",
                   help="apply the spec to the prompt's prefill too (default: the prefill runs dense, decode steps sparse)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with the compiled step (default: on where the model supports it; the first compile "
                        "on a machine takes a minute or two, later ones load from the cache)")
    p = sub.add_parser("calibrate", help="turn a target sparsity into thresholds (a spec)")
    _model_args(p)
    p.add_argument("--out", type=Path, help="write the spec JSON here")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "greedy"],
                   help="same target everywhere, or greedy per-layer allocation (TEAL)")
    p = sub.add_parser("eval", help="perplexity, KL and agreement of a spec on held-out text")
    _model_args(p)
    _quality_args(p)
    p = sub.add_parser("sweep", help="quality against sparsity for methods, allocations and targets")
    _model_args(p, sparse=False)
    p.add_argument("--methods", nargs="+", default=["teal"], choices=["teal", "cats", "topk"])
    p.add_argument("--allocations", nargs="+", default=["uniform", "greedy"], choices=["uniform", "greedy"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.25, 0.4, 0.5, 0.6])
    p.add_argument("--text", type=Path, help="your own evaluation text file")
    _quality_args(p)
    from . import bench
    p = sub.add_parser("bench", help="kernel and decode benchmarks")
    bench.add_arguments(p)
    add_device_argument(p)
    from . import selfcheck
    p = sub.add_parser("selfcheck", help="kernel correctness, quick kernel benchmark and SmolLM2 decode in one JSON")
    p.add_argument("--parts", nargs="+", default=list(selfcheck.PARTS), choices=selfcheck.PARTS)
    p.add_argument("--json", action="store_true", help="one JSON object")
    add_device_argument(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            from . import bench
            return bench.run(args) or 0
        if args.command == "selfcheck":
            from . import selfcheck
            report = selfcheck.run(models.resolve_device(args.device), tuple(args.parts))
            print(json.dumps(report) if args.json else json.dumps(report, indent=1))
            return 0 if report["ok"] else 1
        held = Lab.load(args.model, dtype=args.dtype, layout=args.layout, device=args.device,
                        trust_remote_code=args.trust_remote_code, device_map=args.device_map)
        commands = {"info": cmd_info, "prepare": cmd_prepare, "generate": cmd_generate, "calibrate": cmd_calibrate,
                    "eval": cmd_eval, "sweep": cmd_sweep}
        commands[args.command](args, held)
    except (lab.ModelLoadError, SpecError, lab.GenerationError, peer.PeerMissing, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
