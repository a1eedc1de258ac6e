"""Recipes: every problem reported at once with file, line and dotted path; overrides; paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import alias_bomb

from peftctl import recipe
from peftctl.errors import RecipeError
from peftctl.recipe.schema import unwrap_model

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
        "r.yaml:10 data.format: must be one of 'text', 'completion', 'alpaca', 'chat', 'sharegpt', 'preference', "
        "'classification' or 'token_classification' (got 'chatt')",
        "r.yaml:12 train.max_steps: must be an integer (got 'ten')",
    ]


def test_unknown_section_and_missing_required():
    got = problems("modle: {}\ndata: {format: chat}\noutput: {dir: x}\n")
    assert "r.yaml:1 modle: unknown field; did you mean 'model'?" in got
    assert "r.yaml:2 data.train: required field is missing" in got


def test_a_cross_field_error_points_at_the_field_it_names():
    """Checks across fields fail on their section (or the recipe): placed at the field named first."""
    text = GOOD.replace("  max_steps: 10\n", "  max_steps: 10\n  lr: 1.0e-4\n  cpo_alpha: 2\n")
    assert problems(text) == ["r.yaml:14 train.cpo_alpha: train.cpo_alpha applies to objective simpo, not sft: "
                              "remove it or set train.objective"]
    assert problems(GOOD, ["train.cpo_alpha=2"])[0].startswith("--set train.cpo_alpha=2 train.cpo_alpha:")
    whole = GOOD.replace("  format: chat\n", "  format: chat\n  packing: true\n") + "  \n"
    whole = whole.replace("adapter:\n  method: lora\n  r: 8\n  lora_alpha: 16\n",
                          "adapter:\n  method: prompt_tuning\n  num_virtual_tokens: 4\n")
    whole = whole.replace("  target_modules: [q_proj, v_proj]\n", "")
    # A recipe-wide check (adapter x data) names data.packing, written on line 9.
    assert problems(whole)[0].startswith("r.yaml:9 data.packing:")
    # A message that names no field: the section's line, as before.
    assert problems(GOOD.replace("  max_steps: 10\n", "  max_steps: 10\n  epochs: 1\n")) == [
        "r.yaml:11 train: set max_steps or epochs, not both"]


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


# ---- hostile and unusual YAML ------------------------------------------------------------------


def test_alias_bomb_is_refused_at_once():
    import time

    text = alias_bomb()  # 9**7 = 4.8 million values; 53 s and 1.2 GiB before expansion was capped
    start = time.perf_counter()
    got = problems(text)
    elapsed = time.perf_counter() - start
    # f (line 6) is the first key whose expansion crosses 100,000 values (9**6 = 531,441)
    assert got == ["r.yaml:6 f: more than 100,000 values once YAML aliases are expanded (an alias repeats all it "
                   "names); a recipe is far smaller"]
    assert elapsed < 5, f"refusing took {elapsed:.1f}s"  # about 0.2 s here; the cap is what bounds it
    # the same through --set
    got = problems(GOOD, ["adapter.target_modules=[" + alias_bomb(3, 50).replace("\n", ", ")[:-2] + "]"])
    assert got[0].startswith("--set: --set 'adapter.target_modules=") and "more than 100,000 values" in got[0]


def test_recursive_aliases_and_deep_nesting_are_refused():
    assert problems("a: &x [*x]\n") == ["r.yaml:1 a.0: a YAML alias inside the value it names (a recursive alias)"]
    got = problems(GOOD.replace("model:\n", "model: &m\n  <<: *m\n"))
    assert got == ["r.yaml:1 model: a YAML alias inside the value it names (a recursive alias)"]
    got = problems("data: " + "[" * 5000 + "]" * 5000 + "\n")
    assert got == ["r.yaml:1: nested deeper than 64 levels"]
    # nesting that aliases build up, one level per line
    chain = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 200))
    # a63 (line 64) holds its number 65 levels down
    assert problems(chain) == ["r.yaml:64 a63: nested deeper than 64 levels once YAML aliases are expanded"]


def test_merge_keys_work_and_errors_point_at_the_line_written():
    text = """\
x-source: &source
  format: alpaca
  columns: {instruction: q, output: a}
x-adapter: &adapter {r: 4, lora_alpha: 8}
adapter:
  <<: *adapter
  r: 16
data:
  train:
    - <<: *source
      path: a.jsonl
    - <<: [{weight: 2, columns: {instruction: question, output: answer}}, *source]
      path: b.jsonl
    - <<: *source
      path: c.jsonl
output: {dir: out}
"""
    r = recipe.loads(text, source="r.yaml", base_dir="/base")
    assert r.adapter.r == 16 and r.adapter.lora_alpha == 8  # the mapping's own key wins over the merged one
    first, second, third = r.data.train
    assert first.path == "/base/a.jsonl" and first.format == "alpaca" and first.columns == {"instruction": "q", "output": "a"}
    # the earlier merged mapping wins over the later one
    assert second.format == "alpaca" and second.weight == 2 and second.columns == {"instruction": "question", "output": "answer"}
    assert third == first.model_copy(update={"path": "/base/c.jsonl"})
    # an error in a merged field is reported at the line where that value is written (line 2), for
    # each place it is merged into
    got = problems(text.replace("format: alpaca", "format: alpacca"))
    assert got == [f"r.yaml:2 data.train.{i}.format: must be one of 'text', 'completion', 'alpaca', 'chat', "
                   "'sharegpt', 'preference', 'classification' or 'token_classification' (got 'alpacca')"
                   for i in range(3)]
    got = problems(text.replace("lora_alpha: 8", "lora_alpha: .nan"))
    assert got == ["r.yaml:4 adapter.lora_alpha: must be a finite number (got nan)"]
    assert problems(text.replace("<<: *adapter", "<<: 3")) == [
        "r.yaml:6 adapter: a merge key (<<) takes a mapping or a list of mappings"]
    # the x- keys are not fields, so they are not in the recipe as it runs
    assert "x-source" not in r.to_yaml() and "<<" not in r.to_yaml()


def _float_fields():
    """(dotted field, adapter method it belongs to ("" outside adapter), kind) for every float field in
    the schema."""
    from typing import get_args

    from pydantic import BaseModel

    from peftctl.adapters.registry import config_classes

    def floats(annotation) -> str | None:
        if annotation is float:
            return "scalar"
        args = get_args(annotation)
        if annotation is not None and getattr(annotation, "__origin__", None) is dict and args[1] is float:
            return "dict"
        return next((k for a in args if (k := floats(a))), None)

    out = []

    def walk(model: type[BaseModel], prefix: str, base: str):
        for name, field in model.model_fields.items():
            kind = floats(field.annotation)
            if kind:
                out.append((f"{prefix}{name}", base, kind))
            sub = unwrap_model(field.annotation, None)
            if sub is not None and sub is not model:
                walk(sub, f"{prefix}{name}.", base)

    for section, field in recipe.Recipe.model_fields.items():
        if section == "adapter":
            for cls in config_classes():  # base: the method whose recipe has the field
                walk(cls, "adapter.", cls.model_fields["method"].default)
        else:
            sub = unwrap_model(field.annotation, None)
            walk(sub, f"{section}.", "")
    return out


FLOAT_FIELDS = _float_fields()


def test_float_fields_are_found():
    names = {f for f, _, _ in FLOAT_FIELDS}
    # the walk sees every kind of place a float sits: plain, optional, in a dict, in a list's items
    assert {"train.lr", "train.epochs", "train.max_grad_norm", "adapter.lora_alpha", "adapter.alpha_pattern",
            "data.train.weight", "model.quantization.int8_threshold"} <= names


@pytest.mark.parametrize("field,method,kind", FLOAT_FIELDS, ids=[f"{f}-{m}" if m else f for f, m, _ in FLOAT_FIELDS])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_no_float_field_takes_inf_or_nan(field, method, kind, value):
    sets = [f"adapter={{method: {method}}}"] if method and method != "lora" else []
    if field.startswith("model.quantization."):
        sets.append("model.quantization.bits=8" if "int8" in field else "model.quantization.bits=4")
    if field == "data.train.weight":
        sets.append(f"data.train=[{{path: a.jsonl, weight: {value}}}]")
        target = "data.train.0.weight"
    elif kind == "dict":
        sets.append(f"{field}={{q_proj: {value}}}")
        target = field  # a dict value is placed at the dict
    else:
        sets.append(f"{field}={value}")
        target = field
    got = problems(GOOD, sets)
    assert any(p.startswith(f"--set {sets[-1]} {target}: must be a finite number") for p in got), got


def test_non_finite_numbers_in_the_file_and_the_python_api():
    from pydantic import ValidationError

    from peftctl import LoraConfig

    assert problems(GOOD.replace("max_steps: 10", "lr: 1e400")) == [
        "r.yaml:12 train.lr: must be a finite number (got '1e400')"]
    assert problems(GOOD.replace("max_steps: 10", "epochs: 1e400")) == [
        "r.yaml:12 train.epochs: must be a finite number (got '1e400')"]
    assert problems(GOOD.replace("lora_alpha: 16", "lora_alpha: .inf")) == [
        "r.yaml:6 adapter.lora_alpha: must be a finite number (got inf)"]
    with pytest.raises(ValidationError, match="finite number"):
        LoraConfig(lora_alpha=float("inf"))


def test_seed_is_one_every_seeded_library_takes():
    import random

    import numpy as np
    import torch

    assert problems(GOOD.replace("max_steps: 10", "seed: -1")) == ["r.yaml:12 train.seed: must be >= 0 (got -1)"]
    assert problems(GOOD.replace("max_steps: 10", f"seed: {2**40}")) == [
        f"r.yaml:12 train.seed: must be <= 4294967295 (got {2**40})"]
    assert problems(GOOD.replace("max_steps: 10", f"seed: {2**70}")) == [
        f"r.yaml:12 train.seed: must be between -2**63 and 2**63 - 1, the integers torch and numpy hold (got {2**70})"]
    assert problems(GOOD.replace("max_steps: 10", "seed: 2**70")) == [
        "r.yaml:12 train.seed: must be an integer (got '2**70')"]
    top = recipe.loads(GOOD.replace("max_steps: 10", f"seed: {recipe.MAX_SEED}"), base_dir="/b").train.seed
    np.random.seed(top), torch.manual_seed(top), random.seed(top)  # the largest accepted seed works in each
    with pytest.raises(ValueError):
        np.random.seed(top + 1)  # and one more would not


def test_set_blames_the_flag_for_the_sections_it_creates():
    assert problems(GOOD, ["nope.x=1"]) == [
        "--set nope.x=1 nope: unknown field; known fields: model, adapter, data, train, eval, tracking, output"]
    got = problems(GOOD, ["model.quantization.bits=3"])
    assert got == ["--set model.quantization.bits=3 model.quantization.bits: must be one of 4 or 8 (got 3)"]
    # a section that the file has stays the file's: its own problem is placed at its line
    got = problems(GOOD.replace("max_steps: 10", "max_steps: 10\n  epochs: 1"), ["train.lr=1e-3"])
    assert got == ["r.yaml:11 train: set max_steps or epochs, not both"]


def test_symlinked_data_files_keep_their_name(tmp_path):
    # A content-addressed store (the hub cache) links a named file to a nameless blob: the file's
    # type comes from the name it was given under.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "3f2a9c").write_text('{"text": "hello"}\n')
    (tmp_path / "train.jsonl").symlink_to(tmp_path / "blobs" / "3f2a9c")
    r = recipe.loads("data: {train: train.jsonl, format: text}\noutput: {dir: out}\n", base_dir=tmp_path)
    assert r.data.train[0].path == str(tmp_path / "train.jsonl")


def test_no_integer_beyond_int64_anywhere():
    huge = 10**30  # torch raised a many-line C++ overflow error for adapter.r; other fields overflowed later
    got = problems(GOOD.replace("r: 8", f"r: {huge}"), [f"train.grad_accum={huge}", f"adapter.layers_to_transform=[1, {huge}]"])
    bound = "must be between -2**63 and 2**63 - 1, the integers torch and numpy hold"
    assert got == [f"r.yaml:5 adapter.r: {bound} (got {huge})",
                   f"--set adapter.layers_to_transform=[1, {huge}] adapter.layers_to_transform.1: {bound} (got {huge})",
                   f"--set train.grad_accum={huge} train.grad_accum: {bound} (got {huge})"]


def test_other_tools_names_for_fields_are_theirs_one_field_each_and_in_the_docs():
    import dataclasses
    import inspect

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, TrainingArguments

    from peftctl.adapters.registry import METHODS, config_classes
    from peftctl.recipe.foreign import ADAPTER_ALSO_KNOWN_AS, foreign_name_table

    table = foreign_name_table()
    # one recipe field per foreign name and tool (what a "did you mean" or a converter looks up)
    for tool in recipe.TOOLS:
        seen: dict[str, str] = {}
        for t, foreign, dotted in table:
            if t == tool:
                assert seen.setdefault(foreign, dotted) == dotted, (tool, foreign, seen[foreign], dotted)
    # the names we say are transformers' are transformers' (this installed version's)
    training_args = {f.name for f in dataclasses.fields(TrainingArguments)}
    bnb_args = set(inspect.signature(BitsAndBytesConfig.__init__).parameters)
    loading_doc = inspect.getdoc(PreTrainedModel.from_pretrained) + inspect.getdoc(AutoModelForCausalLM.from_pretrained)
    for t, foreign, dotted in table:
        if t != "transformers":
            continue
        if dotted.startswith("model.quantization."):
            assert foreign in bnb_args, (foreign, dotted)
        elif dotted.startswith("model."):
            assert f"{foreign} (" in loading_doc, (foreign, dotted)
        else:
            assert foreign in training_args, (foreign, dotted)
    # the adapter's table names real fields of each method's config class
    classes = {c.model_fields["method"].default: c for c in config_classes()}
    assert set(ADAPTER_ALSO_KNOWN_AS) <= set(METHODS)
    for method, fields in ADAPTER_ALSO_KNOWN_AS.items():
        assert set(fields) <= set(classes[method].model_fields), method
    # the renamed ones the issue lists, and their place in the generated reference
    transformers, axolotl = recipe.foreign_names("transformers"), recipe.foreign_names("axolotl")
    llamafactory = recipe.foreign_names("llamafactory")
    assert {k: transformers[k] for k in ("learning_rate", "gradient_accumulation_steps", "save_steps",
                                         "per_device_train_batch_size", "num_train_epochs", "logging_steps",
                                         "save_total_limit", "eval_steps", "output_dir")} == {
        "learning_rate": "train.lr", "gradient_accumulation_steps": "train.grad_accum",
        "save_steps": "train.save_every", "per_device_train_batch_size": "train.batch_size",
        "num_train_epochs": "train.epochs", "logging_steps": "train.log_every",
        "save_total_limit": "train.keep_checkpoints", "eval_steps": "train.eval_every", "output_dir": "output.dir"}
    assert axolotl["micro_batch_size"] == "train.batch_size" and axolotl["num_epochs"] == "train.epochs"
    assert axolotl["sequence_len"] == "data.max_length" and axolotl["lora_r"] == "adapter.r"
    assert llamafactory["lora_rank"] == "adapter.r" and llamafactory["cutoff_len"] == "data.max_length"
    assert llamafactory["model_name_or_path"] == "model.name_or_path"
    doc = recipe.reference_markdown()
    assert "| `learning_rate` / `learning_rate` / `learning_rate` |" in doc.split("| `lr` |")[1].split("\n")[0]
    assert doc.split("| `r` |")[1].split("\n")[0].endswith("| - / `lora_r` / `lora_rank` |")
    assert "### `model.quantization`: `QuantizationSection`" in doc  # nested sections get their table
    with pytest.raises(ValueError, match="unknown tool"):
        recipe.foreign_names("trl")
