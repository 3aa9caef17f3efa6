"""``bitcompile inspect``: the tables it prints, the files it writes, and one-line errors (exit 2)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import bitcompile
from bitcompile.cli import main, parse_option
from bitcompile.model_loader import ModelLoadError, load_model

MODELS = textwrap.dedent(
    """
    import torch
    from bitcompile.models import MLP, TinyLlama, TinyLlamaConfig

    def mlp():
        torch.manual_seed(0)
        return MLP(16, [32, 32], 4), (torch.randn(2, 16),)

    def llama():
        torch.manual_seed(0)
        return TinyLlama(TinyLlamaConfig(num_layers=2)), (torch.randint(0, 64, (1, 8)),)

    def single_tensor():
        return torch.nn.Linear(8, 8), torch.randn(2, 8)

    def mismatched():
        return MLP(16, [32], 4), (torch.randn(2, 8),)

    def not_a_pair():
        return torch.nn.Linear(8, 8)

    def not_a_module():
        return "model", (torch.randn(2, 8),)

    def raises():
        raise RuntimeError("checkpoint missing\\nsecond line")

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "inspect_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("inspect_models", None)
    yield tmp_path
    sys.modules.pop("inspect_models", None)


def test_parse_option_values():
    assert parse_option("group_size=128") == ("group_size", 128)
    assert parse_option("group_size=tensor") == ("group_size", "tensor")
    assert parse_option("activations=none") == ("activations", None)
    assert parse_option("exclude=lm_head,*.router") == ("exclude", ["lm_head", "*.router"])


@pytest.mark.parametrize("word, value", [("True", True), ("true", True), ("1", True), ("yes", True), ("ON", True),
                                         ("False", False), ("false", False), ("0", False), ("no", False), ("off", False)])
def test_bool_options_accept_true_false_words(word, value):
    """Issue 15 item 17: ``--option freeze=True`` used to be rejected (the string 'True' is not a bool)."""
    assert parse_option(f"freeze={word}") == ("freeze", value)
    assert bitcompile.TernaryConfig.from_options(dict([parse_option(f"freeze={word}")])).freeze is value


def test_bool_option_with_another_word_is_one_line_exit_2(models, capsys):
    line = _inspect_error(capsys, "inspect_models:mlp", "--option", "freeze=maybe")
    assert line == "bitcompile inspect: error: --option 'freeze=maybe' is invalid: freeze expects true or false (also yes/no, on/off, 1/0)"


def test_inspect_prints_tables_and_writes_json(models, capsys):
    out_json = models / "out" / "report.json"
    code = main(["inspect", "inspect_models:llama", "--option", "group_size=32", "--json", str(out_json)])
    assert code == 0
    out = capsys.readouterr().out
    # per-layer table: module path, shape, decision, reason, group size, bytes
    assert "layers.0.self_attn.q_proj" in out and "64x64" in out
    assert "float" in out and "weight is shared with an embedding at embed_tokens" in out
    assert "groups of 32" in out and "KiB" in out
    assert "rewritten 14 / skipped 2 layers" in out  # the tied lm_head and the embedding
    assert "graphs: 1, graph breaks: 0" in out
    assert "\x1b[" not in out  # not a TTY: no colour codes
    data = json.loads(out_json.read_text())
    assert data["schema_version"] == 2
    assert data["config"]["group_size"] == 32
    assert data["totals"]["rewritten"] == 14 and data["totals"]["skipped"] == 2
    embedding, layer = data["graphs"][0]["layers"][:2]
    assert embedding["kind"] == "embedding" and embedding["lowered_to"] == [] and not embedding["rewritten"]
    assert layer["lowered_to"] == ["bitcpm.ternary_linear", "getitem"] and layer["node"]


def test_inspect_writes_html(models, capsys):
    code = main(["inspect", str(models / "inspect_models.py") + ":mlp", "--html", str(models / "html")])
    assert code == 0
    page = (models / "html" / "index.html").read_text()
    assert "hidden.0" in page and "<svg" in page
    assert (models / "html" / "graph_0.svg").read_text().startswith("<svg")


def test_inspect_reports_graph_breaks_with_reason(tmp_path, monkeypatch, capsys):
    (tmp_path / "breaking.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Breaks(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a = torch.nn.Linear(8, 16)
                    self.b = torch.nn.Linear(16, 8)

                def forward(self, x):
                    h = self.a(x)
                    torch._dynamo.graph_break()
                    return self.b(torch.relu(h))

            def build():
                return Breaks(), (torch.randn(2, 8),)
            """
        )
    )
    assert main(["inspect", str(tmp_path / "breaking.py") + ":build", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "graphs: 2, graph breaks: 1" in out and "break: " in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["graph_break_count"] == 1 and data["graph_break_reasons"]


def _inspect_error(capsys, *argv):
    code = main(["inspect", *argv])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("inspect_models:missing", "has no attribute 'missing'"),
        ("inspect_models:NOT_CALLABLE", "is a int, not a function"),
        ("inspect_models:not_a_pair", "must return (model, example_inputs), got Linear"),
        ("inspect_models:not_a_module", "with an nn.Module first, got str"),
        ("inspect_models:raises", "calling raises() failed: RuntimeError: checkpoint missing"),
        ("nonexistent_thing", "is neither 'module:function' nor an existing folder"),
    ],
)
def test_bad_model_is_one_line_exit_2(models, capsys, spec, message):
    line = _inspect_error(capsys, spec)
    assert line.startswith("bitcompile inspect: error:") and message in line


def test_unknown_option_is_one_line_exit_2(models, capsys):
    line = _inspect_error(capsys, "inspect_models:mlp", "--option", "grup_size=32")
    assert "unknown bitcpm option 'grup_size'" in line and "allowed options" in line
    line = _inspect_error(capsys, "inspect_models:mlp", "--option", "group_size")
    assert "expected key=value" in line


def test_debug_shows_traceback(models, capsys):
    assert main(["inspect", "inspect_models:not_a_module", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ModelLoadError" in err


def test_loader_accepts_single_tensor_and_file_paths(models):
    model, inputs = load_model("inspect_models:single_tensor")
    assert isinstance(model, torch.nn.Linear) and len(inputs) == 1
    with pytest.raises(ModelLoadError, match="is a file, not a folder"):
        load_model(str(models / "inspect_models.py"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(models / "nope.py") + ":build")


def test_hf_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    line = _inspect_error(capsys, str(tmp_path))
    assert "has no *.safetensors weights" in line and "pytorch_model.bin" in line
    (tmp_path / "config.json").unlink()
    assert "has no config.json" in _inspect_error(capsys, str(tmp_path))


def test_hf_folder_loads_from_disk(tmp_path, capsys, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["inspect", str(tmp_path / "hf"), "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    names = {layer["name"] for graph in data["graphs"] for layer in graph["layers"]}
    assert "model.layers.1.mlp.down_proj" in names
    assert data["totals"]["rewritten"] == 14  # 2 layers x 7 projections; lm_head is tied


def test_console_script_exit_status(models):
    result = subprocess.run(
        [sys.executable, "-m", "bitcompile.cli", "inspect", "no_such_module_xyz:f"], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_mismatched_example_inputs_give_one_line_without_torch_logs(models):
    """Issue 15 item 17: torch's fake-tensor logger used to print ~20 lines of traceback first,
    and the one line said only "RuntimeError when making fake tensor call"."""
    result = subprocess.run(
        [sys.executable, "-m", "bitcompile.cli", "inspect", "inspect_models:mismatched"],
        capture_output=True, text=True, cwd=models,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "bitcompile inspect: error: capturing 'inspect_models:mismatched' failed: the model fails on its example "
        "inputs without torch.compile too: RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x8 and 16x32)"
    )


def test_explain_with_mismatched_inputs_raises_without_logging(log_records):
    from bitcompile.models import MLP

    with log_records("torch._subclasses.fake_tensor") as records:
        with pytest.raises(Exception, match="must have same reduction dim"):
            bitcompile.explain(MLP(16, [32], 4), torch.randn(2, 8))
    assert [r.getMessage() for r in records] == []


def test_cann_target_shows_torch_npu_ops(models, capsys):
    assert main(["inspect", "inspect_models:llama", "--target", "cann", "--json", str(models / "c.json")]) == 0
    out = capsys.readouterr().out
    data = json.loads((models / "c.json").read_text())
    lowered = [layer["lowered_to"] for layer in data["graphs"][0]["layers"] if layer["rewritten"]]
    if not any(ops and ops[0].startswith("npu.") for ops in lowered):
        pytest.skip("this checkout's backend does not run passes.lower_cann for target='cann' yet")
    assert "lowering for target 'cann'" in out and "npu.npu_quant_matmul" in out
    assert all(ops == ["npu.npu_dynamic_quant", "npu.npu_quant_matmul"] for ops in lowered)


@pytest.mark.parametrize(
    "flag, target, message",
    [
        ("--html", "a_file", "--html '{root}/a_file' is a file, not a folder"),
        ("--html", "/dev/null/report", "--html '/dev/null/report' cannot be written: '/dev/null' is not a folder"),
        ("--json", "a_dir", "--json '{root}/a_dir' is a folder; give a file path"),
        ("--mlir", "a_dir", "--mlir '{root}/a_dir' is a folder; give a file path"),
        ("--json", "a_file/r.json", "--json '{root}/a_file/r.json' cannot be written: '{root}/a_file' is not a folder"),
    ],
)
def test_unwritable_output_path_is_one_line_exit_2_before_the_capture(models, capsys, monkeypatch, flag, target, message):
    """Issue 15 item 14: these used to print a traceback (exit 1) after the whole capture had run."""
    (models / "a_file").write_text("")
    (models / "a_dir").mkdir()
    captured = []
    monkeypatch.setattr("bitcompile.explain", lambda *a, **k: captured.append(a))  # must not be reached
    path = target if target.startswith("/") else str(models / target)
    line = _inspect_error(capsys, "inspect_models:mlp", flag, path)
    assert line == "bitcompile inspect: error: " + message.format(root=models)
    assert captured == []


@pytest.mark.parametrize("group_size", [-1, 48])
def test_cann_lowering_is_a_field_the_report_reads(group_size):
    """target="cann": each layer's plan is ``LayerDecision.lowering``; its reason and ``lowered_to`` come from it."""
    from bitcompile.models import MLP

    torch.manual_seed(0)
    report = bitcompile.explain(MLP(96, [64], 32), torch.randn(2, 96), target="cann", group_size=group_size)
    if all(layer.lowering is None for layer in report.rewritten):
        pytest.skip("this checkout's backend does not run passes.lower_cann for target='cann' yet")
    graph = report.graphs[0]
    assert graph.record.graph_module is None  # the report keeps what it shows, not the graph module
    rows = {row["name"]: row for row in graph.to_json()["layers"]}
    for layer in report.rewritten:
        lowering = layer.lowering
        assert lowering.target == "cann" and layer.reason == f"{layer.rationale}; {lowering.summary}"
        assert rows[layer.name]["reason"] == layer.reason and "lowering" not in rows[layer.name]
        if group_size == -1:  # per-row W1.58A8 fits npu_quant_matmul
            assert lowering.kernels == ("npu.npu_dynamic_quant", "npu.npu_quant_matmul")
            assert lowering.summary.startswith("Ascend A2: ") and graph.lowered_to(layer) == list(lowering.kernels)
        else:  # groups of 48 are not a multiple of 32: bitcpm's own ops, and the summary says why
            assert lowering.kernels == () and "group size 48 is not a multiple of 32" in lowering.summary
            assert graph.lowered_to(layer)[0] == "bitcpm.ternary_linear"
