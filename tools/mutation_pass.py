"""A small mutation pass over peftctl: do the tests notice when the code is changed?

    python tools/mutation_pass.py map                      # which tests run which lines (once, ~10 min)
    python tools/mutation_pass.py run --max-mutants 300    # sample mutants, run the tests that reach each
    python tools/mutation_pass.py map --merge TEST...      # map tests added since (after edits: lines move)
    python tools/mutation_pass.py confirm --only FILE      # survivors against those tests (FILE: ids)
    python tools/mutation_pass.py report                   # the table again, and every survivor's diff
    python tools/mutation_pass.py show ID                  # one mutant's diff

Run it from the repository root with the project's venv (`nice -n 15 .venv/bin/python tools/...`).
Everything goes to `.mutation/` (git-ignored): `coverage.json` (map), `mutants.jsonl` (results,
appended as they finish, so an interrupted `run` continues where it stopped), `logs/`.

How it works (no dependency beyond pytest; mutmut 3 wants to own the package layout and run
every test under its trampolines, which this project's subprocess and multi-process tests defeat):

1. **map**: the suite runs once with a `sys.settrace` line tracer limited to `peftctl/`, recording
   for each test the peftctl lines it executes, its duration and outcome. Lines run while the test
   modules are imported count for every test that reaches the same file. Tests that fail on this
   machine without any mutant (`test_quantized` on CPUs with avx512_bf16, issue 9 §1) are never used
   to judge a mutant. Lines run only in a subprocess (`peftctl train --num-processes`, the SIGKILL
   test's child) are not seen: a mutant there is reported as not reached, never as killed.
2. **generate**: each target file is parsed and every mutation point listed: arithmetic and
   comparison operators swapped (`+`/`-`, `*`/`/`, `<`/`<=`, `==`/`!=`, `in`/`not in`, ...), `and`/`or`,
   `not` removed, an `if`/`while` condition negated, `min`/`max` swapped, numbers changed (n -> n+1,
   0 <-> 1, floats doubled), `True`/`False` flipped, `break`/`continue` swapped, `+=`/`-=` swapped, and
   statements deleted (replaced by `pass`). Not mutated: docstrings, strings (messages), f-strings,
   annotations, `raise` arguments, calls that only report (`reporter.*`, `log*`, `warn*`, `print`),
   `__all__`, and pydantic `Field(...)` descriptions. Each mutant is the file with one source
   segment replaced, checked to parse to exactly the intended AST.
3. **run**: a random sample (seeded, proportional over files) of the mutants whose line some
   passing test reaches. For each: the mutated file is written into a scratch copy of the
   repository, and a process forked from one that already imported torch, transformers, accelerate
   and peft (22 s of imports on a loaded 2-core machine, saved per mutant) runs the tests that
   reach the line, fastest first, within a time budget, stopping at the first failure. A failure,
   an error or a timeout kills the mutant; all passing means it survived.
4. **confirm**: the survivors again, against the reaching tests the budget left out, or only the
   tests named in `--only FILE` (tests added since the sample: map them first with `map --merge`,
   since edits move lines). Each survivor is first found again in today's source (the same text
   and replacement on a line of the same text, the nearest), so edits since the sample move it
   rather than lose it; one whose line was rewritten is reported `gone`. Cheapest first;
   `--max-minutes` stops starting new ones, and the same `--phase` continues later.

Results are facts about the tests, not verdicts: each survivor needs a reading (equivalent,
harmless, or a gap in the tests), which the report leaves to a person.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
# The causal-LM loss was peftctl/train/loss.py when the pass began (issue 10 moved it).
TARGETS = ("peftctl/train", "peftctl/data", "peftctl/adapters", "peftctl/loss.py")
# Timing-dependent under load, several processes, or children the tracer cannot see: never used
# to judge a mutant (their in-process code paths are run by other tests as well).
EXCLUDED_TESTS = ("test_sigkill_then_resume", "test_sigterm_finishes", "test_two_processes_over_gloo",
                  "test_fsdp2_checkpoint_state")
PRELOAD = ("torch", "numpy", "yaml", "pydantic", "typer", "safetensors.torch", "tokenizers", "transformers",
           "transformers.models.llama.modeling_llama", "accelerate", "peft", "pytest", "rich")
HARNESS_EXIT, HARNESS_ERROR = 99, "harness-error"
KIND_WEIGHT = {"delete-statement": 0.5}
_CO_OPTIMIZED = 0x0001  # inspect.CO_OPTIMIZED: set for function bodies, not for module or class bodies
REPORTING_CALLS = {"log", "advance", "start", "stop", "warn", "warning", "info", "debug", "print", "echo"}


# ----------------------------------------------------------------------------------------------
# 1. map: which tests run which lines


class LineTracer:
    """A pytest plugin: per test nodeid, the set of 'relpath:line' of peftctl code it executed."""

    def __init__(self, root: Path):
        self.prefix = str(root / "peftctl") + os.sep
        self.root = str(root) + os.sep
        self.current = "<import>"
        self.lines: dict[str, set[str]] = {"<import>": set()}
        self.tests: dict[str, dict] = {}
        self._wanted: dict[object, bool] = {}

    def _global(self, frame, event, arg):
        code = frame.f_code
        wanted = self._wanted.get(code)
        if wanted is None:
            wanted = self._wanted[code] = code.co_filename.startswith(self.prefix)
        return self._local if wanted else None

    def _local(self, frame, event, arg):
        if event == "line":
            # Module and class bodies run once, when first imported (by whichever test): their lines
            # count as import-time lines, reached by every test that reaches the file.
            owner = self.current if frame.f_code.co_flags & _CO_OPTIMIZED else "<import>"
            self.lines.setdefault(owner, set()).add(f"{frame.f_code.co_filename[len(self.root):]}:{frame.f_lineno}")
        return self._local

    def pytest_sessionstart(self, session):
        import threading

        threading.settrace(self._global)
        sys.settrace(self._global)

    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid
        self.tests.setdefault(nodeid, {"duration": 0.0, "outcome": "passed"})

    def pytest_runtest_logreport(self, report):
        t = self.tests.setdefault(report.nodeid, {"duration": 0.0, "outcome": "passed"})
        t["duration"] += report.duration
        if report.outcome == "failed":
            t["outcome"] = "failed"
        elif report.outcome == "skipped" and t["outcome"] == "passed":
            t["outcome"] = "skipped"

    def pytest_runtest_logfinish(self, nodeid, location):
        self.current = "<import>"

    def pytest_sessionfinish(self, session, exitstatus):
        sys.settrace(None)
        import threading

        threading.settrace(None)


def cmd_map(args) -> None:
    WORK.mkdir(exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(ROOT))
    import pytest

    _default_sigint()
    tracer = LineTracer(ROOT)
    t0 = time.time()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", *args.pytest_args,
                        *[f"--deselect={n}" for n in _excluded_nodeids(ROOT)]], plugins=[tracer])
    seconds = round(time.time() - t0, 1)
    data = {"root": str(ROOT), "exit": int(code), "seconds": seconds,
            "tests": tracer.tests, "lines": {k: sorted(v) for k, v in tracer.lines.items()}}
    if args.merge and (WORK / "coverage.json").exists():  # a partial map updates the full one
        old = json.loads((WORK / "coverage.json").read_text())
        old["tests"].update(data["tests"])
        for k, v in data["lines"].items():
            old["lines"][k] = sorted(set(old["lines"].get(k, [])) | set(v)) if k == "<import>" else v
        data = old
        # Drop tests that no longer exist (renamed or removed since the full map).
        for nodeid in list(data["tests"]):
            path, _, name = nodeid.partition("::")
            func = name.split("[")[0]
            source = (ROOT / path).read_text(encoding="utf-8") if (ROOT / path).exists() else ""
            if f"def {func}(" not in source:
                data["tests"].pop(nodeid)
                data["lines"].pop(nodeid, None)
    (WORK / "coverage.json").write_text(json.dumps(data))
    passing = sum(t["outcome"] == "passed" for t in tracer.tests.values())
    print(f"map: {len(tracer.tests)} tests ({passing} passing) in {seconds} s -> {WORK / 'coverage.json'}")


def _default_sigint() -> None:
    # A job started in the background (`nohup ... &`) inherits SIGINT ignored; the signal tests
    # expect the interpreter's default handler, as in a terminal or CI.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _excluded_nodeids(root: Path) -> list[str]:
    out = []
    for path in sorted((root / "tests").glob("test_*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("def test_") and any(line[4:].startswith(name) for name in EXCLUDED_TESTS):
                out.append(f"tests/{path.name}::{line[4:line.index('(')]}")
    return out


# ----------------------------------------------------------------------------------------------
# 2. generate: mutation points


@dataclass
class Mutant:
    id: str
    file: str
    line: int
    kind: str
    before: str
    after: str
    start: tuple[int, int]
    end: tuple[int, int]
    replacement: str
    context: str = ""  # the enclosing function and the line's text: finds the mutant again after edits


_BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
               ast.FloorDiv: ast.Div, ast.Mod: ast.Mult, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr,
               ast.BitOr: ast.BitAnd, ast.LShift: ast.RShift, ast.RShift: ast.LShift}
_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


def _skipped_subtrees(tree: ast.AST) -> set[int]:
    """ids of nodes whose subtrees are never mutated: messages, annotations, docstrings, reporting."""
    skip: set[int] = set()

    def mark(node):
        for n in ast.walk(node):
            skip.add(id(n))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            mark(body[0])  # docstring
        if isinstance(node, ast.Raise):
            mark(node)  # the exception and its message (deleting the raise is a statement mutant)
        elif isinstance(node, ast.JoinedStr | ast.Assert):
            mark(node)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.arg) and node.annotation is not None:
            mark(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.returns is not None:
                mark(node.returns)
            for d in node.decorator_list:
                mark(d)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in REPORTING_CALLS or name.startswith("log"):
                mark(node)
            if name == "Field":
                for kw in node.keywords:
                    if kw.arg == "description":
                        mark(kw.value)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            mark(node)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            mark(node)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            mark(node)
    return skip


def _is_reporting_stmt(node: ast.stmt) -> bool:
    if not isinstance(node, ast.Expr) or not isinstance(node.value, ast.Call):
        return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    f = node.value.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in REPORTING_CALLS or name.startswith("log")


def mutation_points(source: str) -> list[tuple[ast.AST, ast.AST, str]]:
    """(node, mutated copy, kind) for every mutation point of a module's source."""
    tree = ast.parse(source)
    skip = _skipped_subtrees(tree)
    out: list[tuple[ast.AST, ast.AST, str]] = []

    def add(node, kind, change):
        new = copy.deepcopy(node)
        change(new)
        out.append((node, new, kind))

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
            add(node, "binop", lambda n: setattr(n, "op", _BINOP_SWAP[type(n.op)]()))
        elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAP:
            add(node, "augassign", lambda n: setattr(n, "op", _BINOP_SWAP[type(n.op)]()))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMP_SWAP:
                    add(node, "compare", lambda n, i=i: n.ops.__setitem__(i, _CMP_SWAP[type(n.ops[i])]()))
        elif isinstance(node, ast.BoolOp):
            add(node, "boolop", lambda n: setattr(n, "op", ast.Or() if isinstance(n.op, ast.And) else ast.And()))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append((node, copy.deepcopy(node.operand), "not-removed"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            v = node.value
            if isinstance(v, bool):
                new_v = not v
            elif isinstance(v, int):
                new_v = 1 if v == 0 else 0 if v == 1 else v + 1
            else:
                new_v = 1.0 if v == 0 else v * 2
            add(node, "constant", lambda n, new_v=new_v: setattr(n, "value", new_v))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            add(node, "min-max", lambda n: setattr(n.func, "id", "max" if n.func.id == "min" else "min"))
        if isinstance(node, ast.If | ast.While) and id(node.test) not in skip:
            out.append((node.test, ast.UnaryOp(op=ast.Not(), operand=copy.deepcopy(node.test)), "negate-condition"))
        if isinstance(node, ast.Break | ast.Continue):
            out.append((node, ast.Continue() if isinstance(node, ast.Break) else ast.Break(), "break-continue"))
        elif isinstance(node, ast.stmt) and not isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Pass | ast.Import | ast.ImportFrom
                | ast.Global | ast.Nonlocal | ast.Break | ast.Continue) and not _is_reporting_stmt(node):
            out.append((node, ast.Pass(), "delete-statement"))
    return out


def _offset(lines: list[str], line: int, col: int) -> int:
    # ast columns are UTF-8 byte offsets
    return sum(len(x) for x in lines[: line - 1]) + len(lines[line - 1].encode()[:col].decode())


def generate(root: Path, files: list[str]) -> list[Mutant]:
    mutants: list[Mutant] = []
    for rel in files:
        source = (root / rel).read_text(encoding="utf-8")
        lines = source.splitlines(keepends=True)
        where = _functions(source)
        for node, new, kind in mutation_points(source):
            start = _offset(lines, node.lineno, node.col_offset)
            end = _offset(lines, node.end_lineno, node.end_col_offset)
            text = ast.unparse(new)
            replacement = text if isinstance(new, ast.stmt) else f"({text})"
            mutated = source[:start] + replacement + source[end:]
            try:
                mtree = ast.parse(mutated)
            except SyntaxError:
                continue
            # The mutated file must be the intended AST: the original with exactly this node replaced.
            expected = ast.parse(source)
            target = next(n for n in ast.walk(expected) if type(n) is type(node)
                          and (n.lineno, n.col_offset, n.end_lineno, n.end_col_offset)
                          == (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset))
            _replace_node(expected, target, new)
            if ast.dump(mtree) != ast.dump(expected) or ast.dump(mtree) == ast.dump(ast.parse(source)):
                continue
            before = source[start:end]
            mid = f"{rel}:{node.lineno}:{node.col_offset}:{kind}:{replacement[:40]}"
            mutants.append(Mutant(id="", file=rel, line=node.lineno, kind=kind, before=before.strip()[:200],
                                  after=replacement.strip()[:200], start=(node.lineno, node.col_offset),
                                  end=(node.end_lineno, node.end_col_offset), replacement=replacement,
                                  context=f"{where.get(node.lineno, '')}|{lines[node.lineno - 1].strip()}"))
            mutants[-1].id = _short_hash(mid)
    return mutants


def _functions(source: str) -> dict[int, str]:
    """line -> the innermost function or class around it (dotted), for every line inside one."""
    out: dict[int, str] = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                for line in range(child.lineno, child.end_lineno + 1):
                    out[line] = name
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def _replace_node(tree: ast.AST, target: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is target:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is target:
                        value[i] = new
                        return
    raise LookupError("node not found")


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:10]


def mutated_source(root: Path, m: Mutant) -> str:
    source = (root / m.file).read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    start, end = _offset(lines, *m.start), _offset(lines, *m.end)
    return source[:start] + m.replacement + source[end:]


def target_files(root: Path) -> list[str]:
    paths = [p for t in TARGETS for p in ([root / t] if t.endswith(".py") else (root / t).rglob("*.py"))]
    return sorted(str(p.relative_to(root)) for p in paths if p.is_file())


# ----------------------------------------------------------------------------------------------
# 3. run


def tests_for(m: Mutant, cov: dict) -> list[str]:
    """Passing tests that execute the mutant's line (or, for import-time lines, any line of its file)."""
    key = f"{m.file}:{m.line}"
    usable = {n for n, t in cov["tests"].items() if t["outcome"] == "passed"}
    hits = [n for n in usable if key in cov["line_sets"].get(n, ())]
    if not hits and key in cov["line_sets"].get("<import>", ()):
        hits = [n for n in usable if any(x.startswith(m.file + ":") for x in cov["line_sets"].get(n, ()))]
    return sorted(hits, key=lambda n: cov["tests"][n]["duration"])


def _scratch(root: Path) -> Path:
    scratch = WORK / "tree"
    if scratch.exists():
        shutil.rmtree(scratch)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        src = root / rel
        if src.is_file() and not rel.startswith((".mutation/", "runs/")):
            dst = scratch / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return scratch


def _run_tests_forked(scratch: Path, tests: list[str], log: Path, timeout: float) -> tuple[str, float]:
    """pytest on `tests` in a forked child importing peftctl from `scratch`; (outcome, seconds)."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(scratch)
            sys.path.insert(0, str(scratch))
            os.environ["PYTHONPATH"] = str(scratch)
            os.environ["HF_HUB_OFFLINE"] = "1"
            import pytest

            code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(scratch),
                                *tests])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
        except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
            import traceback

            traceback.print_exc()
            os._exit(HARNESS_EXIT)
    deadline = t0 + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.time() - t0
        time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    # pytest: 0 all passed, 1 a test failed, 2 interrupted (a collection or import error), 3 internal
    # error; 4 (usage: a test id that does not exist) and 5 (no tests) say nothing about the mutant.
    outcome = {0: "survived", 1: "killed", 4: HARNESS_ERROR, 5: HARNESS_ERROR,
               HARNESS_EXIT: HARNESS_ERROR}.get(code, f"killed-error-{code}")
    return outcome, time.time() - t0


def load_cov() -> dict:
    path = WORK / "coverage.json"
    if not path.exists():
        sys.exit(f"no {path}: run `python tools/mutation_pass.py map` first")
    cov = json.loads(path.read_text())
    cov["line_sets"] = {k: set(v) for k, v in cov["lines"].items()}
    return cov


def cmd_run(args) -> None:
    cov = load_cov()
    mutants = generate(ROOT, target_files(ROOT))
    reached = [m for m in mutants if tests_for(m, cov)]
    rng = random.Random(args.seed)
    by_file: dict[str, list[Mutant]] = {}
    for m in reached:
        by_file.setdefault(m.file, []).append(m)
    # Proportional over files (each file at least one), then shuffled.
    share = args.max_mutants / max(len(reached), 1)
    sample: list[Mutant] = []
    for _, ms in sorted(by_file.items()):
        k = min(len(ms), max(1, round(len(ms) * share)))
        # Weighted sampling without replacement (Efraimidis-Spirakis keys u^(1/w)): statement
        # deletions are half of all points and mostly coarse, so they weigh half.
        keyed = sorted(ms, key=lambda m: -rng.random() ** (1 / KIND_WEIGHT.get(m.kind, 1.0)))
        sample += keyed[:k]
    rng.shuffle(sample)
    sample = sample[: args.max_mutants]
    previous = WORK / "generated.json"
    if previous.exists() and not args.resample:  # continue the sample already begun
        by_id = {m.id: m for m in mutants}
        ids = json.loads(previous.read_text())["sampled"]
        missing = [i for i in ids if i not in by_id]
        if missing:
            sys.exit(f"{len(missing)} sampled mutants no longer exist (the source changed): rerun with --resample")
        sample = [by_id[i] for i in ids]
    print(f"{len(mutants)} mutants generated in {len(target_files(ROOT))} files; {len(reached)} on lines a "
          f"passing test reaches; running {len(sample)}", flush=True)
    (WORK / "generated.json").write_text(json.dumps(
        {"generated": len(mutants), "reached": len(reached), "sampled": [m.id for m in sample],
         "by_kind": _count(m.kind for m in mutants),
         "unreached_by_file": _count(m.file for m in mutants if m not in reached)}))

    # Harness errors (the child failed outside pytest: e.g. the venv was being reinstalled) are no
    # verdict on the mutant: they run again.
    done = {r["id"] for r in _results() if r["outcome"] != HARNESS_ERROR}
    scratch = _prepare_children()
    for i, m in enumerate(sample):
        if m.id in done:
            continue
        tests = tests_for(m, cov)
        chosen, budget = [], 0.0
        for n in tests:  # fastest first, within the time budget
            if chosen and budget + cov["tests"][n]["duration"] > args.budget:
                break
            chosen.append(n)
            budget += cov["tests"][n]["duration"]
        _judge(m, chosen, scratch, timeout=args.timeout_factor * budget + 60, phase="sample",
               label=f"{i + 1}/{len(sample)}", tests_reaching=len(tests))
    cmd_report(args)


def _judge(m: Mutant, chosen: list[str], scratch: Path, *, timeout: float, phase: str, label: str,
           tests_reaching: int, previous: list[str] = ()) -> str:
    """Run `chosen` against mutant `m` in the scratch tree; append the record; return the outcome."""
    original = (scratch / m.file).read_text(encoding="utf-8")
    (scratch / m.file).write_text(mutated_source(ROOT, m), encoding="utf-8")
    log = WORK / "logs" / f"{m.id}.log"
    try:
        outcome, secs = _run_tests_forked(scratch, chosen, log, timeout=timeout)
    finally:
        (scratch / m.file).write_text(original, encoding="utf-8")
    failed = [x.split(" ", 2)[1] for x in log.read_text(errors="replace").splitlines()
              if x.startswith(("FAILED ", "ERROR "))] if log.exists() else []
    rec = {**asdict(m), "outcome": outcome, "seconds": round(secs, 1), "tests_run": list(dict.fromkeys([*previous, *chosen])),
           "tests_reaching": tests_reaching, "failed": failed[:3], "phase": phase}
    with (WORK / "mutants.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    if outcome == "killed":  # keep the logs of survivors, errors and timeouts
        log.unlink(missing_ok=True)
    print(f"[{label}] {phase} {outcome:9s} {secs:6.1f}s {m.file}:{m.line} {m.kind}: "
          f"{m.before[:50]!r} -> {m.after[:50]!r} {failed[:1]}", flush=True)
    return outcome


def _prepare_children() -> Path:
    for mod in PRELOAD:  # imported once here; every forked child reuses them
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - optional ones may be missing
            pass
    _default_sigint()
    assert "peftctl" not in sys.modules, "the parent must not import peftctl: children import the mutant"
    (WORK / "logs").mkdir(exist_ok=True)
    return _scratch(ROOT)


def cmd_confirm(args) -> None:
    """Survivors of the sampled run again, with every reaching test that has not judged them yet
    (no time budget): the tests the budget left out, or tests added since (after `map --merge`).
    The cheapest run first; with --max-minutes the rest wait for the next confirm of this phase."""
    cov = load_cov()
    current = generate(ROOT, target_files(ROOT))
    todo = [r for r in _results(sampled_only=True) if r["outcome"] == "survived" and r.get("phase") != args.phase]
    only = [x.strip() for x in Path(args.only).read_text().splitlines() if x.strip()] if args.only else []
    runs = []
    for r in todo:
        m = relocate(r, current)
        if m is None:  # its code is gone or rewritten since the sample: no longer judged
            _append({**r, "outcome": "gone", "phase": args.phase})
            print(f"{args.phase} gone {r['file']}:{r['line']} {r['kind']}: {r['before'][:50]!r} "
                  "(the code changed since the sample)", flush=True)
            continue
        tests = tests_for(m, cov)
        ran = set(r["tests_run"])
        chosen = [n for n in tests if _named(n, only)] if only else [n for n in tests if n not in ran]
        if not chosen:  # nothing new reaches it: it stays a survivor, at today's position
            _append({**r, **asdict(m), "phase": args.phase})
            continue
        runs.append((sum(cov["tests"][n]["duration"] for n in chosen), r, m, tests, chosen))
    runs.sort(key=lambda x: x[0])
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    scratch = _prepare_children() if runs else None
    for i, (cost, r, m, tests, chosen) in enumerate(runs):
        if deadline and time.time() > deadline:
            print(f"--max-minutes reached: {len(runs) - i} survivors not judged in phase {args.phase!r} "
                  "(run confirm again with the same phase to continue)", flush=True)
            break
        _judge(m, chosen, scratch, timeout=args.timeout_factor * cost + 60, phase=args.phase,
               label=f"{i + 1}/{len(runs)}", tests_reaching=len(tests), previous=r["tests_run"])
    cmd_report(args)


def _append(rec: dict) -> None:
    with (WORK / "mutants.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


def relocate(r: dict, current: list[Mutant]) -> Mutant | None:
    """The mutant of record `r` in today's source, under `r`'s id: the same file, kind, text and
    replacement, on the nearest line (the code around it may have moved since the sample); None
    when no such mutation point is left."""
    same = [m for m in current if (m.file, m.kind, m.before, m.replacement)
            == (r["file"], r["kind"], r["before"], r["replacement"])]
    context = r.get("context") or _sample_context(r)
    function, _, text = context.partition("|")
    if context:  # the same text on a rewritten line is another mutant (a function may be renamed)
        same = [m for m in same if m.context.partition("|")[2] == text]
    if not same:
        return None
    m = min(same, key=lambda m: (m.id != r["id"], m.context.partition("|")[0] != function,
                                 abs(m.line - r["line"]), m.start[1] != r["start"][1]))
    return dataclasses.replace(m, id=r["id"])


def _sample_context(r: dict) -> str:
    """A record's context from the sampled source, for records written before contexts were
    recorded: `.mutation/sample-source/` holds a copy of the files as they were sampled."""
    path = WORK / "sample-source" / r["file"]
    if not path.exists():
        return ""
    source = path.read_text(encoding="utf-8")
    return f"{_functions(source).get(r['line'], '')}|{source.splitlines()[r['line'] - 1].strip()}"


def _named(nodeid: str, names: list[str]) -> bool:
    """Whether a test id is one of `names`: a test id, a function without its parameters, or a file."""
    return any(nodeid == x or nodeid.startswith((x + "[", x + "::")) for x in names)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------
# 4. report


def _all_records() -> list[dict]:
    path = WORK / "mutants.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    for r in rows:  # older records counted these exits as error kills
        if r["outcome"] in (f"killed-error-{HARNESS_EXIT}", "killed-error-4", "killed-error-5"):
            r["outcome"] = HARNESS_ERROR
    return rows


def _results(sampled_only: bool = False) -> list[dict]:
    rows = _all_records()
    latest: dict[str, dict] = {}
    for r in rows:  # a re-run replaces an earlier result; a harness error replaces nothing
        if r["outcome"] != HARNESS_ERROR or r["id"] not in latest:
            latest[r["id"]] = r
    if sampled_only and (WORK / "generated.json").exists():
        sampled = set(json.loads((WORK / "generated.json").read_text())["sampled"])
        return [r for r in latest.values() if r["id"] in sampled]
    return list(latest.values())


def _diff(r: dict) -> str:
    m = Mutant(**{k: (tuple(v) if k in ("start", "end") else v) for k, v in r.items() if k in Mutant.__dataclass_fields__})
    source = (ROOT / m.file).read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    try:
        here = source[_offset(lines, *m.start): _offset(lines, *m.end)].strip()[:200]
    except IndexError:  # the file is shorter now
        here = None
    if here != m.before:
        return f"    (the source moved since this result: {m.before!r} -> {m.after!r})"
    a = source.splitlines()
    b = mutated_source(ROOT, m).splitlines()
    return "\n".join(difflib.unified_diff(a, b, m.file, m.file + " (mutant)", n=1, lineterm=""))


def cmd_report(args) -> None:
    rows = _results(sampled_only=True)  # the latest sample's mutants, their latest result
    gen = json.loads((WORK / "generated.json").read_text()) if (WORK / "generated.json").exists() else {}
    if gen:
        print(f"generated {gen['generated']} ({', '.join(f'{k} {v}' for k, v in gen['by_kind'].items())}); "
              f"on lines a passing test reaches {gen['reached']}; sampled {len(gen['sampled'])}")
    sampled = {r["id"] for r in rows}
    history = [r for r in _all_records() if r["id"] in sampled]
    state: dict[str, str] = {}
    for phase in dict.fromkeys(r.get("phase", "sample") for r in history):  # in order of first appearance
        for r in history:
            if r.get("phase", "sample") == phase and (r["outcome"] != HARNESS_ERROR or r["id"] not in state):
                state[r["id"]] = r["outcome"]
        print(f"after {phase}:", ", ".join(f"{k} {v}" for k, v in _count(state.values()).items()))
    per_file: dict[str, dict[str, int]] = {}
    for r in rows:
        d = per_file.setdefault(r["file"], {"run": 0, "survived": 0})
        d["run"] += 1
        d["survived"] += r["outcome"] == "survived"
    print(f"{'file':42s} {'run':>4s} {'survived':>8s}")
    for f, d in sorted(per_file.items()):
        print(f"{f:42s} {d['run']:4d} {d['survived']:8d}")
    survivors = sorted((r for r in rows if r["outcome"] == "survived"), key=lambda r: (r["file"], r["line"]))
    print(f"\n{len(survivors)} survivors:")
    for r in survivors:
        print(f"\n[{r['id']}] {r['file']}:{r['line']} {r['kind']} (judged by {len(r['tests_run'])} tests; "
              f"{r['tests_reaching']} reach its line in today's map)")
        if getattr(args, "diffs", True):
            print(_diff(r))
    gone = sorted((r for r in rows if r["outcome"] == "gone"), key=lambda r: (r["file"], r["line"]))
    if gone:
        print(f"\n{len(gone)} survivors whose code changed since the sample (no longer judged):")
        for r in gone:
            print(f"[{r['id']}] {r['file']}:{r['line']} {r['kind']}: {r['before'][:60]!r} -> {r['after'][:60]!r}")


def cmd_show(args) -> None:
    for r in _results():
        if r["id"] == args.id:
            print(json.dumps({k: v for k, v in r.items() if k != "replacement"}, indent=1))
            print(_diff(r))
            return
    sys.exit(f"no mutant {args.id}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("map", help="run the suite under the line tracer")
    m.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. a subset of tests)")
    m.add_argument("--merge", action="store_true", help="update the existing map with these tests' results")
    r = sub.add_parser("run", help="generate, sample and run mutants")
    r.add_argument("--max-mutants", type=int, default=300)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--budget", type=float, default=60.0, help="seconds of (mapped) test time per mutant")
    r.add_argument("--timeout-factor", type=float, default=4.0)
    r.add_argument("--resample", action="store_true", help="draw a new sample instead of continuing the last one")
    c = sub.add_parser("confirm", help="run the survivors again with every reaching test not yet run")
    c.add_argument("--phase", default="confirm", help="a name for this round (a survivor is judged once per phase)")
    c.add_argument("--timeout-factor", type=float, default=4.0)
    c.add_argument("--max-minutes", type=float, help="stop starting mutants after this long (wall time)")
    c.add_argument("--only", help="a file of test ids, one a line (a function without its parameters names them "
                                  "all; a file path names its tests): run only these, e.g. tests added or changed "
                                  "since the sample; they run again even if they ran before")
    rep = sub.add_parser("report", help="summarize the results")
    rep.add_argument("--no-diffs", dest="diffs", action="store_false")
    s = sub.add_parser("show", help="one mutant's record and diff")
    s.add_argument("id")
    args, extra = p.parse_known_args()
    if extra and args.cmd != "map":
        p.error(f"unrecognized arguments: {extra}")
    if args.cmd == "map":
        args.pytest_args = [*args.pytest_args, *extra]
    {"map": cmd_map, "run": cmd_run, "confirm": cmd_confirm, "report": cmd_report, "show": cmd_show}[args.cmd](args)


if __name__ == "__main__":
    main()
