"""The peer benchmark's plumbing: what it says without a build, how it reads llama-bench, what every surface shows.
(The measurement itself needs `make peer`'s eight-minute build; bench peer's output is in docs/PERFORMANCE.md.)"""
import json
import subprocess
import sys

import pytest

from sparse_core import peer, stakeholder_report


@pytest.fixture
def no_build(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_LAB_PEER", str(tmp_path / "nothing"))


def test_without_the_build_bench_peer_says_to_run_make_peer(no_build):
    assert peer.missing() == "llama.cpp is not built here: run `make peer` (about eight minutes on two cores) first."
    done = subprocess.run([sys.executable, "-m", "sparse_core", "bench", "peer", "--json"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"error: {peer.missing()}"


def test_llama_bench_is_run_decode_only_with_the_threads_given_and_read_as_json(tmp_path, monkeypatch):
    """A stand-in llama-bench that records its arguments and prints what the real one prints with -o json."""
    monkeypatch.setenv("SPARSE_LAB_PEER", str(tmp_path))
    tool = peer.tool("llama-bench")
    tool.parent.mkdir(parents=True)
    log = tmp_path / "args.json"
    tool.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(log)!r}, 'w'))\n"
                    "print(json.dumps([{'build_commit': 'abc1234', 'build_number': 7, 'avg_ts': 51.9, "
                    "'stddev_ts': 0.4, 'n_gen': 64, 'n_prompt': 0}]))\n")
    tool.chmod(0o755)
    rate, build = peer.llama_rate("F32", threads=2, tokens=64)
    assert rate == 51.9 and build == "abc1234 (build 7)"
    args = json.loads(log.read_text())
    assert args[args.index("-t") + 1] == "2" and args[args.index("-p") + 1] == "0"
    assert args[args.index("-n") + 1] == "64" and args[args.index("-m") + 1].endswith("-F32.gguf")


RESULT = {"machine": "AMD EPYC, 2 threads", "threads": 2, "tokens": 64, "rounds": 3, "llama_cpp": "abc1234 (build 7)",
          "rows": [{"decoder": "llama.cpp", "precision": "F32", "setting": "dense", "tok_s": 52.0, "q1": 51.8,
                    "q3": 52.2, "rounds": [51.8, 52.0, 52.2]},
                   {"decoder": "lab", "precision": "F32", "setting": "TEAL 50%", "tok_s": 60.0, "q1": 59.0,
                    "q3": 61.0, "rounds": [59.0, 60.0, 61.0], "vs_llama_cpp": 1.154, "vs_lab_dense": 1.5,
                    "bound": 1.65}]}


def test_the_peer_table_is_the_same_on_the_page_and_in_the_report():
    frame = peer.table(RESULT)
    assert list(frame["tok/s"]) == [52.0, 60.0] and frame["× llama.cpp (same precision)"].iloc[1] == 1.154
    html = _report(RESULT)
    assert "abc1234 (build 7)" in html and "<td>60.0</td>" in html and "<td>1.154</td>" in html
    assert "make peer" in _report(None)


def _report(result) -> str:
    """A report with nothing but its peer section's input varied."""
    setting = {"model": "SmolLM2-135M-Instruct", "spec": "TEAL at 50%"}
    headline = {"weight_reads_skipped": 0.4, "speedup": None, "bound": 1.65, "ppl_dense": 12.0, "ppl_sparse": 13.0,
                "ppl_increase": 0.08, "top1_agreement": 0.9, "kl": 0.04, "quality_protocol": "dense prefill",
                "sentence": "Skips 40% of weight reads."}
    return stakeholder_report.build(setting, headline, {"prompt": "p", "dense": "d", "sparse": "d"}, None, {},
                                    machine={"CPU": "Test CPU"}, peer=result)
