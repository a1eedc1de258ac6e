"""Run the test suite under another transformers version than the venv's, without touching the venv.

    python tools/test_transformers.py 4.57.6                 # the whole suite under transformers 4.57.6
    python tools/test_transformers.py 4.56.2 -- -x -q tests/test_prompt.py   # pytest arguments after --

Run it from the repository root with the project's venv (`nice -n 15 .venv/bin/python tools/...`);
`make test-transformers4` runs it for the oldest and newest transformers 4.x that pyproject.toml allows.

1. pip resolves, without installing anything (`pip install --dry-run --report`), what a user of this
   venv gets with `transformers==VERSION` and this project with its `test` and `track` extras: the
   packages whose versions must change with it (transformers 4.x wants huggingface_hub < 1.0 and
   tokenizers <= 0.23.0, which take older datasets and diffusers with them).
2. Exactly those versions are installed (`--no-deps`) into `.transformers-compat/VERSION/`
   (git-ignored; reused while the resolved list is the same).
3. pytest runs with that folder first on PYTHONPATH, then this checkout, HF_HUB_OFFLINE=1; the
   versions it imported are printed first, so a run that did not pick them up shows it.

Exit status: pytest's, or 2 when pip cannot resolve or install the version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / ".transformers-compat"
SHOW = ("transformers", "huggingface_hub", "tokenizers", "datasets", "diffusers", "peft", "trl", "torch")


def fail(message: str):
    print(message, file=sys.stderr)
    sys.exit(2)


def resolve(version: str) -> list[str]:
    """`name==version` of every package that differs from the venv's for transformers `version`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
               f"transformers=={version}", f"{ROOT}[test,track]"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            fail(f"pip cannot resolve transformers=={version} with this project:\n{p.stderr[-3000:]}")
        installs = json.loads(report.read_text())["install"]
    pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installs
                  if i["metadata"]["name"].lower() != "peftctl")
    if not any(pin.lower().startswith("transformers==") for pin in pins):
        fail(f"transformers=={version} is the venv's own: run the suite as usual")
    return pins


def install(version: str, pins: list[str]) -> Path:
    target = FOLDER / version
    marker = target / ".pins.json"
    if marker.is_file() and json.loads(marker.read_text()) == pins:
        return target
    if target.exists():
        shutil.rmtree(target)
    print(f"installing into {target}: {' '.join(pins)}", flush=True)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        *pins], capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"pip could not install {' '.join(pins)}:\n{p.stderr[-3000:]}")
    marker.write_text(json.dumps(pins) + "\n")
    return target


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    version, rest = argv[0], argv[1:]
    pytest_args = rest[1:] if rest[:1] == ["--"] else rest
    target = install(version, resolve(version))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    show = ("import importlib; print('; '.join(n + ' ' + importlib.import_module(n).__version__ "
            f"for n in {SHOW!r}))")
    seen = subprocess.run([sys.executable, "-c", show], env=env, cwd=ROOT, capture_output=True, text=True)
    print(seen.stdout.strip() or seen.stderr[-2000:], flush=True)
    if f"transformers {version};" not in seen.stdout:
        print(f"transformers {version} was not the one imported", file=sys.stderr)
        return 2
    start = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], env=env, cwd=ROOT).returncode
    print(f"transformers {version}: pytest exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
