"""Imports go one way (STYLE.md): base_model imports nothing of ours; align/core imports only base_model."""

import ast

from conftest import ROOT

OURS = ("align", "base_model", "sft", "rm", "ppo", "labeling_ui")
TOP = (
    "align.cli",
    "align.demo",
    "align.demo_eval",
    "align.demo_labelling",
    "align.sweep",
    "align.report",
    "align.bench",
    "align.bench_gpu",
    "align.bench_label",
    "align.inspect_data",
    "align.world",
    "align.config_types",
    "align.tools",
    "align.serve",
)
STAGES = ("sft", "rm", "ppo", "labeling_ui", "base_model.pretrain")


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _check(folder, allowed):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        for mod in _imports(path):
            root = mod.split(".")[0]
            if root in OURS and not any(mod == a or mod.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    return bad


def test_base_model_imports_nothing_of_ours():
    bad = [b for b in _check("base_model", ("base_model",)) if "base_model/pretrain/" not in b]
    assert not bad, bad


def test_core_imports_only_base_model():
    assert not _check("align/core", ("base_model", "align.core")), _check("align/core", ("base_model", "align.core"))


def test_stages_do_not_import_the_top():
    for stage in ("sft", "rm", "ppo", "labeling_ui", "base_model/pretrain"):
        bad = [b for b in _check(stage, OURS) if any(f" {t}" in b for t in TOP)]
        assert not bad, bad


def test_every_top_level_module_is_listed():
    """Each module of `align` is either the shared core or one of the top modules the checks above know."""
    found = {f"align.{p.stem}" for p in (ROOT / "align").glob("*.py") if p.stem != "__init__"}
    found |= {f"align.{p.name}" for p in (ROOT / "align").iterdir() if (p / "__init__.py").exists()}
    assert found - {"align.core", "align.eval"} == set(TOP), found ^ set(TOP)


def test_evaluation_imports_no_trainer():
    """`align/eval` is what trainers call at their evaluation steps: it may score with reward models (`rm.model`,
    PPO's reward-source scorers) but imports no trainer and nothing of the top."""
    allowed = ("base_model", "align.core", "align.eval", "rm.model", "rm.data", "ppo.rewards", "ppo.experience",
               "ppo.rollout")  # fmt: skip  # the rollout engines (ours, vLLM) answer benchmarks
    assert not _check("align/eval", allowed), _check("align/eval", allowed)


def test_tools_and_server_import_no_training_stage():
    """The tool runtime, the code interpreter, the agent adapter and the server sit over `base_model`'s generation."""
    allowed = ("base_model", "align.core", "align.eval", "align.tools", "align.serve")
    bad = _check("align/tools", allowed)
    if (ROOT / "align" / "serve.py").exists():
        bad += [b for b in _check("align", allowed) if b.startswith("align/serve.py")]
    assert not bad, bad


def test_labelling_app_imports_no_training_stage():
    """The app may read and edit taxonomies (`rm.tags.taxonomy` and its review edits, data only, for the Taxonomy
    tab), nothing that trains."""
    training = [s for s in STAGES if s != "labeling_ui"]
    data = ("rm.tags.taxonomy", "rm.tags.review")
    bad = [
        f"{path.relative_to(ROOT)} imports {mod}"
        for path in (ROOT / "labeling_ui").rglob("*.py")
        for mod in _imports(path)
        if any(mod == t or mod.startswith(t + ".") for t in training) and mod not in data
    ]
    assert not bad, bad


def test_ppo_maths_imports_only_torch():
    path = ROOT / "ppo" / "losses.py"
    outside = {m.split(".")[0] for m in _imports(path)} - {"torch", "__future__", "typing", "collections"}
    assert not outside, outside
