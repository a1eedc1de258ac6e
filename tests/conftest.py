"""Shared fixtures: a tiny Llama with its tokenizer, and small chat data, built once per session.

Tests run offline (HF_HUB_OFFLINE=1) with a private peftctl cache, so nothing reaches the hub and
no test touches the user's cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_llama, recipe_text, write_chat_data  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    os.environ["PEFTCTL_CACHE"] = str(tmp_path_factory.mktemp("peftctl-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    return write_chat_data(folder / "train.jsonl", 48, seed=1), write_chat_data(folder / "eval.jsonl", 12, seed=2)


@pytest.fixture
def make_recipe(tmp_path, tiny_model_dir, chat_data):
    """Write a tiny recipe to tmp_path/recipe.yaml and return its path."""

    def make(out: str = "run", **sections) -> Path:
        train, eval_ = chat_data
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe_text(tiny_model_dir, str(train), str(eval_), out, **sections))
        return path

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir):
    """A fresh copy of the tiny model for each call (tests mutate models)."""
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    return load


# A file no one may read, root included: root reads a chmod 000 file, but not a write-only sysctl.
_WRITE_ONLY = Path("/proc/sys/vm/compact_memory")


@pytest.fixture
def make_unreadable():
    """Make the file at a path unreadable to this process (chmod 000; as root, which reads any
    file, a symlink to a write-only kernel file instead). Skips, saying why, where neither works."""
    made = []

    def make(path: Path) -> Path:
        path.write_text("{}\n")
        path.chmod(0)
        made.append(path)
        try:
            path.open("rb").close()
        except PermissionError:
            return path
        path.unlink()
        path.symlink_to(_WRITE_ONLY)
        try:
            path.open("rb").close()
        except PermissionError:
            return path
        except OSError:
            pass
        pytest.skip(f"cannot make a file unreadable here: euid {os.geteuid()} reads chmod 000 files and "
                    f"{_WRITE_ONLY} is not a write-only file")

    yield make
    for path in made:  # let pytest remove its temporary folder
        if path.exists() and not path.is_symlink():
            path.chmod(0o644)
