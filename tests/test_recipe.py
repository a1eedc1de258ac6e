"""Recipes: every problem reported at once with file, line and dotted path; overrides; paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftctl import recipe
from peftctl.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
model:
  name_or_path: smollm2-135m-instruct
adapter:
  method: lora
  r: 8
  lora_alpha: 16
  target_modules: [q_proj, v_proj]
data:
  train: data/train.jsonl
  format: chat
train:
  max_steps: 10
output:
  dir: out
"""


def problems(text: str, overrides=(), source="r.yaml") -> list[str]:
    with pytest.raises(RecipeError) as e:
        recipe.loads(text, source=source, base_dir="/base", overrides=list(overrides))
    return [str(p) for p in e.value.problems]


def test_good_recipe_loads_with_defaults_and_resolved_paths():
    r = recipe.loads(GOOD, source="r.yaml", base_dir="/base")
    assert r.adapter.r == 8 and r.adapter.lora_alpha == 16
    assert r.adapter.target_modules == ["q_proj", "v_proj"]
    assert r.data.train[0].path == "/base/data/train.jsonl"
    assert r.output.dir == "/base/out"
    assert r.model.name_or_path == "smollm2-135m-instruct"  # an alias is not a path
    assert r.train.scheduler == "cosine" and r.train.batch_size == 4


def test_every_error_at_once_with_line_and_path():
    bad = GOOD.replace("r: 8", "r: 0").replace("lora_alpha: 16", "lora_alhpa: 16").replace(
        "format: chat", "format: chatt").replace("max_steps: 10", "max_steps: ten")
    got = problems(bad)
    assert got == [
        "r.yaml:5 adapter.r: must be >= 1 (got 0)",
        "r.yaml:6 adapter.lora_alhpa: unknown field; did you mean 'lora_alpha'?",
        "r.yaml:10 data.format: must be one of 'text', 'completion', 'alpaca', 'chat', 'sharegpt', 'preference' "
        "or 'classification' (got 'chatt')",
        "r.yaml:12 train.max_steps: must be an integer (got 'ten')",
    ]


def test_unknown_section_and_missing_required():
    got = problems("modle: {}\ndata: {format: chat}\noutput: {dir: x}\n")
    assert "r.yaml:1 modle: unknown field; did you mean 'model'?" in got
    assert "r.yaml:2 data.train: required field is missing" in got


def test_yaml_syntax_error_names_line():
    got = problems("model:\n  name_or_path: [unclosed\ndata: {train: x}\n")
    assert len(got) == 1 and got[0].startswith("r.yaml:3: YAML syntax error")


def test_duplicate_key_is_an_error():
    got = problems(GOOD + "train:\n  max_steps: 5\n")
    assert any("duplicate key" in p and "r.yaml:15" in p for p in got)


def test_yaml_loader_is_safe():
    got = problems(GOOD.replace("dir: out", "dir: !!python/object/apply:os.system ['true']"))
    assert got == ["r.yaml:14 output.dir: unsupported YAML tag tag:yaml.org,2002:python/object/apply:os.system"]


def test_wrong_type_of_union_field():
    got = problems(GOOD.replace("[q_proj, v_proj]", "5"))
    assert got == ["r.yaml:7 adapter.target_modules: must be list[str] or str (got 5)"]


def test_set_overrides_are_typed_and_checked():
    r = recipe.loads(GOOD, source="r.yaml", base_dir="/base",
                     overrides=["adapter.r=4", "train.lr=1e-4", "adapter.target_modules=[q_proj]",
                                "adapter.use_rslora=true"])
    assert r.adapter.r == 4 and r.train.lr == 1e-4 and r.adapter.target_modules == ["q_proj"]
    assert r.adapter.use_rslora is True
    got = problems(GOOD, ["adapter.r=zero", "train.lr_rate=3", "noequals", "train.max_steps.x=1"])
    assert "--set adapter.r=zero adapter.r: must be an integer (got 'zero')" in got
    assert any(p.startswith("--set train.lr_rate=3 train.lr_rate: unknown field") for p in got)
    assert any("expected KEY=VALUE" in p for p in got)
    assert any("train.max_steps is not a section" in p for p in got)


def test_set_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = recipe.loads(GOOD, source="r.yaml", base_dir="/base", overrides=["output.dir=elsewhere"])
    assert r.output.dir == str(tmp_path / "elsewhere")
    assert r.data.train[0].path == "/base/data/train.jsonl"


def test_recipe_file_paths_resolve_against_its_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text(GOOD)
    monkeypatch.chdir("/")
    r = recipe.load(tmp_path / "sub" / "r.yaml")
    assert r.data.train[0].path == str(tmp_path / "sub" / "data" / "train.jsonl")


def test_cross_field_checks():
    got = problems(GOOD.replace("max_steps: 10", "max_steps: 10\n  epochs: 2"))
    assert got == ["r.yaml:11 train: set max_steps or epochs, not both"]
    got = problems(GOOD.replace("max_steps: 10", "max_steps: 10\n  eval_every: 5"))
    assert any("eval_every needs eval data" in p for p in got)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        recipe.load(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(RecipeError, match="recipe is empty"):
        recipe.load(tmp_path / "empty.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    from peftctl.validate import check_files

    r = recipe.load(path)
    check_files(r, source=str(path))  # data files exist, model resolvable


def test_recipe_reference_doc_is_current():
    doc = (REPO / "docs" / "recipe.md").read_text()
    assert doc == recipe.reference_markdown() + "\n", "regenerate with: peftctl schema > docs/recipe.md"


def test_adapter_section_is_the_python_config_class():
    from peftctl import LoraConfig

    r = recipe.loads(GOOD, source="r.yaml", base_dir="/base")
    assert type(r.adapter) is LoraConfig
    assert r.adapter == LoraConfig(r=8, lora_alpha=16, target_modules=["v_proj", "q_proj"])
