"""sparse_core.stakeholder_report from hand-made inputs: no model, only small plotly figures."""
import re
from html.parser import HTMLParser

import plotly.graph_objects as go
import pytest

from sparse_core import stakeholder_report
from sparse_core.figures import bandwidth_limits, quality_figure, speed_figure

SETTING = {"model": "SmolLM2-135M-Instruct", "method": "teal", "spec": "TEAL 40% uniform", "target": 0.4,
           "dtype": "float32", "layout": "row-major", "device": "cpu"}
HEADLINE = {"weight_reads_skipped": 0.3456, "speedup": 1.234, "speedup_iqr": [1.187, 1.291], "bound": 1.528,
            "ppl_dense": 12.34, "ppl_sparse": 13.01, "ppl_increase": 0.0543, "top1_agreement": 0.914, "kl": 0.0421,
            "quality_protocol": "dense prefill, sparse decode: 2,048 held-out tokens in 512-token windows",
            "flag": None, "sentence": "Skips 35% of weight reads: ×1.23 faster (bound ×1.53), perplexity +5%."}
TEXTS = {"prompt": "Say <script>alert(1)</script> & explain sparsity.",
         "dense": "Sparsity skips small inputs.", "sparse": "Sparsity skips tiny <b>inputs</b>."}
DIVERGENCE = len("Sparsity skips ")
MACHINE = {"Platform": "Linux-test", "Python": "3.11.7", "PyTorch": "2.x", "CPU": "Test CPU", "CPU cores": "2",
           "Torch threads": "2", "CUDA device": "none", "Generated": "2026-01-01 12:00 UTC"}
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


class _Document(HTMLParser):
    """Checks that every element is closed in order, and keeps what the offline check needs."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.attributes, self.scripts, self.counts = [], [], [], [], {}

    def handle_starttag(self, tag, attrs):
        self.attributes += attrs
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)


def _parse(document: str) -> _Document:
    parsed = _Document()
    parsed.feed(document)
    parsed.close()
    assert parsed.errors == [] and parsed.stack == [], "elements closed out of order or left open"
    return parsed


@pytest.fixture(scope="module")
def figures():
    heatmap = go.Figure(go.Heatmap(z=[[0.1, 0.5, 0.9], [0.3, 0.2, 0.7]], x=["a", "b", "c"], y=["layer 0", "layer 1"]))
    return {"Skipped share per layer and generated token (final state)": heatmap,
            "Speed against the bound": speed_figure(20.0, 24.7, 1.528, speedup=1.234),
            "Quality": quality_figure(12.34, 13.01, 0.914)}


@pytest.fixture(scope="module")
def report_file(tmp_path_factory, figures):
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(stakeholder_report.build(SETTING, HEADLINE, TEXTS, DIVERGENCE, figures, MACHINE), encoding="utf-8")
    return path.read_text(encoding="utf-8")


def test_document_shows_setting_headline_and_texts(report_file):
    assert report_file.startswith("<!DOCTYPE html>")
    assert "<title>Sparsity lab report — SmolLM2-135M-Instruct · TEAL 40% uniform</title>" in report_file
    for value in SETTING.values():
        assert f"<td>{value}</td>" in report_file
    for shown in ("34.6%", "×1.23", "IQR ×1.19–×1.29", "×1.53", "+5.4%", "12.3 → 13.0", "91%", "KL 0.042 nats"):
        assert shown in report_file
    assert HEADLINE["sentence"] in report_file
    assert f"Quality measured with {HEADLINE['quality_protocol']}." in report_file  # every quality figure says how
    assert "Sparsity skips <mark>tiny &lt;b&gt;inputs&lt;/b&gt;.</mark>" in report_file
    assert "<div class='text'>Sparsity skips small inputs.</div>" in report_file  # dense is never marked
    assert "<script>alert" not in report_file and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; explain" in report_file
    for key, value in MACHINE.items():
        assert f"<th>{key}</th><td>{value}</td>" in report_file


def test_document_is_well_formed(report_file):
    parsed = _parse(report_file)
    assert parsed.counts["html"] == parsed.counts["head"] == parsed.counts["body"] == 1
    assert parsed.counts["table"] == 2 and parsed.counts["mark"] == 1


def test_plotly_is_inline_once_and_nothing_is_fetched(report_file, figures):
    parsed = _parse(report_file)
    library = [script for script in parsed.scripts if "plotly.js v" in script]
    assert len(library) == 1 and report_file.count("plotly.js v") == 1
    assert report_file.count("Plotly.newPlot(") == len(figures)
    assert 'src="http' not in report_file and "src='http" not in report_file and "<link" not in report_file
    assert not [value for name, value in parsed.attributes if name in ("src", "href") and value]
    # plotly.js carries default URLs as strings (the geo charts' topojsonURL on cdn.plot.ly) that these charts never
    # load; outside the library there is no URL at all.
    outside = report_file.replace(library[0], "")
    assert re.search(r"https?://|//cdn|@import|url\(", outside) is None


def test_flagged_speedup_is_not_presented():
    headline = {**HEADLINE, "speedup": 1.37, "speedup_iqr": [1.31, 1.44], "flag": "the dense path changed mid-run",
                "sentence": "Skips 35% of weight reads (bound ×1.53), perplexity +5%; the decode measurement was "
                            "flagged, so no speedup is claimed."}
    document = stakeholder_report.build(SETTING, headline, TEXTS, DIVERGENCE, {}, MACHINE)
    _parse(document)
    assert "the dense path changed mid-run" in document and "not shown as a result" in document
    for hidden in ("1.37", "1.31", "1.44"):
        assert hidden not in document
    assert "plotly" not in document.lower()  # no charts, no library


def test_missing_speedup_says_not_measured_and_identical_texts_are_unmarked():
    headline = {**HEADLINE, "speedup": None, "speedup_iqr": None, "flag": None,
                "sentence": "Skips 35% of weight reads (bound ×1.53), perplexity +5%; decode speed not measured yet."}
    texts = {**TEXTS, "sparse": TEXTS["dense"]}
    document = stakeholder_report.build(SETTING, headline, texts, None, {}, MACHINE)
    _parse(document)
    assert "not measured" in document and "×1.23" not in document
    assert "<mark>" not in document and "same text as dense" in document


def test_none_values_show_as_a_dash_and_machine_defaults_to_this_one():
    document = stakeholder_report.build({**SETTING, "target": None}, HEADLINE, TEXTS, DIVERGENCE, {})
    assert "<th>Target</th><td>—</td>" in document
    for key in stakeholder_report.machine_info():
        assert f"<th>{key}</th>" in document


def test_machine_info():
    info = stakeholder_report.machine_info()
    assert set(info) == {"Platform", "Python", "PyTorch", "CPU", "CPU cores", "Torch threads", "CUDA device", "Generated"}
    assert all(isinstance(value, str) and value for value in info.values())
    assert int(info["CPU cores"]) >= 1 and int(info["Torch threads"]) >= 1


def test_speed_figure_draws_the_bound_as_the_best_sparse_rate():
    figure = speed_figure(20.0, 24.7, 1.5, speedup=1.234)
    bars = figure.data[0]
    assert list(bars.x) == ["dense", "sparse"] and list(bars.y) == [20.0, 24.7] and bars.text[1] == "×1.23"
    (line,) = figure.layout.shapes
    assert line.y0 == line.y1 == pytest.approx(30.0) and line.line.dash == "dash"
    assert figure.layout.annotations[0].text == "bound ×1.50"
    assert figure.layout.yaxis.range[1] > 30.0
    assert speed_figure(20.0, 24.7, 1.5).data[0].text[1] == ""  # no valid speedup, no label


def test_speed_figure_draws_each_runs_bandwidth_limit_over_its_bar():
    decode = dict(bandwidth_gbs=45.0, weight_bytes_per_token=538_000_000, sparse_weight_bytes_per_token=330_000_000)
    limits = bandwidth_limits(decode)
    assert limits == pytest.approx((45e9 / 538e6, 45e9 / 330e6))
    figure = speed_figure(20.0, 24.7, 1.63, speedup=1.2, limits=limits)
    dotted = [shape for shape in figure.layout.shapes if shape.line.dash == "dot"]
    assert [(s.x0 + s.x1) / 2 for s in dotted] == pytest.approx([0, 1])  # over the dense bar, then the sparse one
    assert [s.y0 for s in dotted] == pytest.approx(list(limits))
    assert figure.layout.yaxis.range[1] > max(limits)
    assert [a.text for a in figure.layout.annotations][1:] == ["bandwidth limit 84 tok/s", "bandwidth limit 136 tok/s"]


def test_quality_figure_has_two_panels():
    figure = quality_figure(12.34, 13.01, 0.914)
    perplexity, agreement = figure.data
    assert list(perplexity.y) == [12.34, 13.01] and list(agreement.y) == [0.914]
    assert perplexity.xaxis == "x" and agreement.xaxis == "x2"
    assert [a.text for a in figure.layout.annotations] == ["Perplexity (lower is better)", "Top-1 agreement with dense"]
    assert figure.layout.yaxis2.tickformat == ".0%"
