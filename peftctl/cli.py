"""The `peftctl` command line: parse, call one library function, render its result.

Exit codes: 0 success, 1 runtime failure, 2 bad input (recipe, flags, files, data). Errors print
one line (or one per recipe problem) without a traceback; `--debug` shows it. Commands that report
results take `--json` and then print exactly one JSON object on stdout; progress goes to stderr.
Heavy imports (torch, transformers) happen inside the commands, so `peftctl --help` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup


class _Commands(TyperGroup):
    """The command group: a usage error (a missing or mistyped flag, found by the parser before the
    command runs) still prints one JSON object on stdout when --json was given."""

    def invoke(self, ctx: Any):
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        _state["emitted"] = False
        try:
            return super().invoke(ctx)
        except Exception as e:
            # Typer carries its own copy of click: its UsageError is known by its shape (exit code 2).
            usage = getattr(e, "exit_code", None) == 2 and callable(getattr(e, "format_message", None))
            if usage and "--json" in args and not _state["emitted"]:
                param = getattr(e, "param", None)
                flag = (param.opts[0] if param.opts else param.name) if param is not None else None
                _write_json(_error_result(e.exit_code, [_error(flag, None, None, e.format_message())]))
            raise


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning (LoRA, DoRA, IA3, AdaLoRA, LoHa, LoKr, VeRA; prompt tuning, P-tuning, "
    "prefix tuning) of transformers models, driven by YAML recipes.",
)

_state = {"debug": False, "emitted": False}

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe field: --set train.lr=1e-4 (repeatable).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    console = _stderr()
    for i, line in enumerate(message.splitlines() or [""]):
        console.print(("error: " if i == 0 else "       ") + line, markup=False)
    raise typer.Exit(code)


def _error(source: str | None, line: int | None, path: str | None, message: str) -> dict[str, Any]:
    return {"source": source, "line": line, "path": path or None, "message": message}


def _errors(e: BaseException) -> list[dict[str, Any]]:
    """An error as `--json` lists it: each problem's source (file or flag), line, dotted path, message."""
    problems = getattr(e, "problems", None)
    if problems:  # a recipe's problems, each placed
        return [_error(p.source, p.line, p.path, p.message) for p in problems]
    path = getattr(e, "path", None)  # a bad user file (userfiles.BadFileError)
    if path is not None and getattr(e, "problem", None):
        return [_error(str(path), None, None, e.problem)]
    flag = re.match(r"--[a-z][a-z0-9-]*", str(e))  # a flag's error names the flag first
    return [_error(flag[0] if flag else None, None, None, str(e))]


def _error_result(code: int, errors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"ok": False, "exit_code": code, "errors": errors}


def _write_json(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    # Out now: a process of a multi-process run may yet be killed while the group tears down, and
    # a pipe's buffer would die with it (the run completed, its one JSON line lost).
    sys.stdout.flush()
    _state["emitted"] = True


def handled(fn):
    """Turn peftctl's errors into a message and an exit code; anything else is exit 1.

    With --json, a failure still prints one JSON object on stdout (unless the command printed its
    own): {"ok": false, "exit_code": N, "errors": [{"source", "line", "path", "message"}, ...]}.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from peftctl.errors import PeftctlError

        _state["emitted"] = False
        as_json = bool(kwargs.get("json_"))

        def fail(message: str, code: int, errors: list[dict[str, Any]]) -> None:
            if as_json and not _state["emitted"]:
                _write_json(_error_result(code, errors))
            _fail(message, code)

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except PeftctlError as e:
            if _state["debug"]:
                raise
            fail(str(e), e.exit_code, _errors(e))
        except KeyboardInterrupt:
            fail("interrupted", 130, [_error(None, None, None, "interrupted")])
        except Exception as e:  # a bug or an unforeseen failure: still one line, exit 1
            if _state["debug"]:
                raise
            from peftctl.fsio import disk_full_reason

            if (reason := disk_full_reason(e)) is not None:  # a full disk is no bug: say so
                _fail(f"{reason} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})", 1)
            first = (str(e).splitlines() or [""])[0]
            fail(f"{type(e).__name__}: {first} (run with --debug for the traceback)", 1,
                 [_error(None, None, None, f"{type(e).__name__}: {first}")])

    return wrapper


def _emit(result: dict[str, Any], as_json: bool, render) -> None:
    if as_json:
        _write_json(result)
    else:
        render(result)


def _load_recipe(path: Path, overrides: list[str] | None):
    from peftctl import recipe

    return recipe.load(path, overrides or [])


def _reporter(quiet: bool = False):
    from peftctl.ui import RichReporter

    return RichReporter(quiet=quiet)


def _print_version(value: bool) -> None:
    if value:
        from peftctl.constants import VERSION

        sys.stdout.write(f"peftctl {VERSION}\n")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print peftctl's version and exit.")] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("PEFTCTL_DEBUG") == "1"


@app.command()
@handled
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="Parse only the first 1,000 rows of each data source.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Check a recipe (schema, files, every data row in its format) without loading any weights.

    --json prints {"recipe", "valid": true, "notes", "resolved"}, or for an invalid recipe (exit 2)
    {"recipe", "valid": false, "ok": false, "exit_code": 2, "errors": [{"source", "line", "path", "message"}]}.
    """
    from peftctl.errors import PeftctlError
    from peftctl.validate import check_files

    try:
        r = _load_recipe(recipe, set_)
        notes = check_files(r, source=str(recipe), rows=1000 if quick else None)
    except PeftctlError as e:
        if json_:
            _write_json({"recipe": str(recipe), "valid": False, **_error_result(e.exit_code, _errors(e))})
        raise
    result = {"recipe": str(recipe), "valid": True, "notes": notes, "resolved": r.model_dump(mode="json")}

    def render(res):
        out = _stdout()
        out.print(f"[green]ok[/green] {recipe}")
        for note in res["notes"]:
            out.print(f"  {note}")

    _emit(result, json_, render)


def _eval_metrics(record: dict) -> str:
    """An evaluation's numbers for a human: the loss, then each other metric (accuracy, f1, exact
    match, rewards/...), four decimals."""
    skip = {"eval_loss", "eval_perplexity", "eval_tokens", "eval_pairs"}
    others = [f"{k.removeprefix('eval_')} {v:.4f}" for k, v in record.items()
              if k.startswith("eval_") and k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join([f"loss {record['eval_loss']:.4f}", *others])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


@app.command()
@handled
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue a run: 'auto' (the latest checkpoint in output.dir; a new run when there is "
             "none) or a checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Resolve everything (recipe, data, model on the meta device), print the plan, "
                          "train nothing.")] = False,
    num_processes: Annotated[int, typer.Option(
        "--num-processes", min=1, help="Run on N processes through accelerate (one per GPU; gloo on CPU).")] = 1,
    json_: JsonOpt = False,
) -> None:
    """Train an adapter as the recipe says; the run folder gets the adapter, checkpoints, metrics and summary."""
    r = _load_recipe(recipe, set_)
    if dry_run:
        from peftctl.train.plan import plan

        _emit(plan(r, num_processes=num_processes, resume=resume), json_, _render_plan)
        return
    if num_processes > 1:
        from peftctl.train.launch import check_devices, launch
        from peftctl.train.plan import plan

        check_devices(num_processes)
        plan(r, num_processes=num_processes, resume=resume)  # input errors exit 2 here, not in N workers
        args = [str(recipe), *(f"--set={s}" for s in set_ or [])]
        args += [f"--resume={resume}"] if resume else []
        args += ["--json"] if json_ else []
        raise typer.Exit(launch(num_processes, args, Path(r.output.dir)))

    from peftctl.train import train as run_train
    from peftctl.train.loop import Diverged
    from peftctl.train.signals import Interrupted

    # Under `accelerate launch`, only the main process reports.
    main = os.environ.get("RANK", "0") == "0"
    try:
        summary = run_train(r, reporter=_reporter(quiet=not main), resume=resume)
    except (Interrupted, Diverged) as e:
        if not main:  # every process stopped at the same step; the main one says so
            raise typer.Exit(e.exit_code) from None
        if json_:  # the summary says how it ended
            sys.stdout.write((Path(r.output.dir) / "summary.json").read_text(encoding="utf-8"))
            _state["emitted"] = True
        raise
    if not main:
        return

    def render(s):
        out = _stdout()
        if s.get("nothing_trained"):
            out.print(f"already finished ({s['nothing_trained']}): nothing trained, nothing written")
            out.print(f"run folder: {s.get('run_dir', r.output.dir)}")
            return
        loss = f", train loss {s['train_loss']:.4f}" if s.get("train_loss") is not None else ""
        why = " (early stopping)" if s.get("stop_reason") == "early_stopping" else ""
        out.print(f"[green]done[/green]: {s['steps']} steps{why} in {s['wall_time_s']:.1f}s{loss}")
        if s.get("final_eval"):
            ev = s["final_eval"]
            shown = [f"{k.removeprefix('eval_')} {v:.4f}" for k, v in ev.items()
                     if k.startswith("eval_") and k != "eval_tokens" and isinstance(v, float)]
            out.print("eval " + ", ".join(shown))
        if s.get("best_eval"):
            b = s["best_eval"]
            metric = b.get("metric", "eval_loss")
            out.print(f"best {metric.replace('_', ' ')} {b.get(metric, b.get('eval_' + metric, b['eval_loss'])):.4f} "
                      f"at step {b['step']}")
        out.print(f"run folder: {s['run_dir']}")

    _emit(summary, json_, render)


def _render_plan(p: dict[str, Any]) -> None:
    out = _stdout()
    mem = p["memory_estimate_bytes"]
    out.print(f"[bold]plan[/bold] (dry run: nothing trained, nothing written) for {p['output_dir']}")
    where = (f"{p['virtual_tokens']} virtual tokens" if p.get("virtual_tokens") is not None
             else f"on {p['adapted_modules']} modules")
    out.print(f"  model        {p['model']} ({p['model_type']}, {p['dtype']}), {p['method']} {where}")
    out.print(f"  parameters   {p['trainable_params']:,} trainable of {p['total_params']:,} "
              f"({p['trainable_percent']:.3f}%)")
    out.print(f"  data         {p['train_examples']} training examples, {p['eval_examples']} eval, "
              f"{p['mean_example_tokens']} tokens each on average")
    out.print(f"  steps        {p['steps']} (global batch {p['global_batch']} on {p['num_processes']} "
              f"process(es), {p['epochs']} epochs, {p['warmup_steps']} warmup)")
    out.print(f"  tokens       about {p['tokens']:,}")
    if p.get("objective_line"):
        out.print(f"  objective    {p['objective_line']}", markup=False)
    kept = f", the last {p['checkpoints_kept']} kept" if p["checkpoints_kept"] < p["checkpoints"] else ""
    best = " (and one at each evaluation that improves eval_loss)" if p["checkpoints_at_best_eval"] else ""
    out.print(f"  checkpoints  {p['checkpoints']}{kept}{best}"
              + (f"; resuming from {p['resume_from']}" if p["resume_from"] else ""))
    if p.get("resume_changes"):
        out.print("  changes      " + "; ".join(p["resume_changes"]), markup=False)
    if p.get("nothing_to_train"):
        out.print(f"  finished     {p['nothing_to_train']}: train would train nothing")
    out.print(f"  memory       about {_gib(mem['total'])} per device: weights {_gib(mem['base_weights'])}, "
              f"adapter+grads+optimizer {_gib(mem['adapter_weights'] + mem['gradients'] + mem['optimizer_states'])}, "
              f"activations {_gib(mem['activations'])}, logits {_gib(mem['logits'])}")
    if p.get("memory_plan"):
        from peftctl.train.budget import describe

        out.print(f"  budget       {describe(p['memory_plan'])}")


def _render_memory(out, mem: dict[str, Any]) -> None:
    from rich.table import Table

    w = mem["workload"]
    gc = mem["gradient_checkpointing"]
    table = Table(title=f"peak training memory per device, batch {w['batch']} × {w['seq_len']} tokens "
                        f"({'with' if gc else 'without'} gradient checkpointing)", title_justify="left")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for kind, n in mem["weights"].items():
        table.add_row(f"base weights, {kind}", _size(n))
    table.add_row("adapter weights", _size(mem["adapter_weights"]))
    table.add_row("adapter gradients", _size(mem["gradients"]))
    table.add_row("optimizer states", _size(mem["optimizer_states"]))
    for on in (True, False):
        mark = " (this recipe)" if on == gc else ""
        key = "activations_with_checkpointing" if on else "activations_without_checkpointing"
        if mem[key] is None:  # a method that refuses checkpointing (prefix tuning)
            continue
        table.add_row(f"activations, checkpointing {'on' if on else 'off'}{mark}", _size(mem[key]))
    table.add_row("logits and loss", _size(mem["logits"]))
    table.add_row("[bold]total[/bold]", f"[bold]{_size(mem['total'])}[/bold]")
    out.print(table)
    out.print("This is accelerator (GPU) memory, what torch allocates on the device. On a CPU, the process's "
              "resident memory (RSS) is higher: the Python interpreter, torch's and the tokenizer's libraries, "
              "the data and the allocator's caches come on top.")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@app.command()
@handled
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.", show_default=False)],
    image: Annotated[bool, typer.Option(help="Write RUN_DIR/curves.png (needs matplotlib).")] = True,
    json_: JsonOpt = False,
) -> None:
    """A run's summary and its loss and eval curves, drawn in the terminal (and as a PNG)."""
    from peftctl.train.report import report as run_report

    result = run_report(run_dir, image=image)

    def render(res):
        out = _stdout()
        s = res["summary"] or {}
        out.print(f"[bold]{res['run_dir']}[/bold]: {s.get('status', 'no summary.json')}, "
                  f"{s.get('steps', '?')} steps", markup=True)
        if s.get("final_eval"):
            out.print(f"  final eval  {_eval_metrics(s['final_eval'])}")
        if s.get("best_eval"):
            best = s["best_eval"]
            name = best.get("metric") or "eval_loss"
            key = name if name.startswith("eval_") else f"eval_{name}"
            if isinstance(best.get(key), (int, float)):
                out.print(f"  best {key.removeprefix('eval_')} {best[key]:.4f} at step {best['step']} "
                          f"(train.metric_for_best)")
        if s.get("tokens_per_s"):
            out.print(f"  {s['tokens_seen']:,} tokens at {s['tokens_per_s']:.0f} tokens/s; "
                      f"peak memory {_gib(s['peak_memory_bytes'])}")
        out.print(res["chart"], markup=False)
        if res["image"]:
            out.print(f"image: {res['image']}")

    _emit(result, json_, render)


@app.command("eval")
@handled
def eval_(
    recipe: RecipeArg,
    adapter: Annotated[Path | None, typer.Option(help="Run folder (or adapter folder) to evaluate.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate the base model without adapter.")] = False,
    predictions: Annotated[Path | None, typer.Option(
        help="Write every answered example (input, reference, prediction, whether it matched; for "
             "classification the label's probability) to this JSON-lines file.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --predictions file.")] = False,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Loss, perplexity and exact match on the recipe's eval data (base or adapter)."""
    from peftctl.errors import InputError
    from peftctl.evaluate import evaluate

    if base and adapter is not None:
        raise InputError("give --adapter or --base, not both")
    if overwrite and predictions is None:
        raise InputError("--overwrite applies to --predictions, which is not given")
    r = _load_recipe(recipe, set_)
    result = evaluate(r, adapter=adapter, base=base, reporter=_reporter(), predictions=predictions,
                      overwrite=overwrite)

    def render(res):
        out = _stdout()
        who = "base model" if res["adapter"] is None else f"adapter {res['adapter']}"
        out.print(f"[bold]{who}[/bold] on {res['examples']} examples")
        out.print(f"  eval_loss   {res['eval_loss']:.4f}")
        if "perplexity" in res:
            out.print(f"  perplexity  {res['perplexity']:.3f}")
        for name in ("accuracy", "f1"):
            if name in res:
                out.print(f"  {name:<11} {res[name]:.4f}")
        for key in ("eval_rewards/accuracies", "eval_rewards/margins"):
            if key in res:
                out.print(f"  {key.removeprefix('eval_'):<19} {res[key]:.4f}")
        if "exact_match" in res:
            out.print(f"  exact_match {res['exact_match']:.3f} ({res['exact_match_n']} answers)")
            for s in res["samples"][:3]:
                mark = "✓" if s["correct"] else "✗"
                out.print(f"    {mark} {s['prediction']!r} (reference {s['reference']!r})", markup=False)
        if res.get("predictions"):
            out.print(f"  predictions in {res['predictions']}", markup=False)

    _emit(result, json_, render)


TargetArg = Annotated[str, typer.Argument(
    help="A run or adapter folder, a merged or plain model folder, a .gguf file or the built-in alias.",
    show_default=False)]
AdapterNameOpt = Annotated[str | None, typer.Option(
    "--adapter", help="Which adapter of a folder that holds several (PEFT's layout: 'default' at the top, "
                      "each other in a subfolder of its name).", show_default=False)]
BaseOpt = Annotated[bool, typer.Option("--base", help="The run's base model without its adapter (same tokenizer "
                                                      "and template), to compare.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")]
TemperatureOpt = Annotated[float, typer.Option(help="0: greedy decoding; above 0: sampling at this temperature.")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling: keep the most likely tokens up to "
                                                               "this total probability (with --temperature > 0).",
                                               show_default=False)]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed for sampling (with --temperature > 0).",
                                             show_default=False)]


def _streamer(gen):
    """A TextStreamer printing the answer as it is made, when stdout is a terminal; else None."""
    if not sys.stdout.isatty():
        return None
    from transformers import TextStreamer

    return TextStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)


@app.command()
@handled
def generate(
    target: TargetArg,
    prompt: Annotated[str | None, typer.Option(help="The prompt (a user message when the model has a chat "
                                                    "template).", show_default=False)] = None,
    input_: Annotated[Path | None, typer.Option(
        "--input", help="A JSON-lines file: one prompt (a JSON string) or list of messages a line.",
        show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the results (JSON lines) to this file instead of stdout.",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output file.")] = False,
    adapter: AdapterNameOpt = None,
    base: BaseOpt = False,
    raw: Annotated[bool, typer.Option("--raw", help="Give the model the prompt text as it is (no chat template, "
                                                    "no data format).")] = False,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Answer a prompt, or every line of a JSON-lines file, with a run's model (or any model): rendered as
    the run's training rendered prompts (its chat template), greedy unless --temperature > 0.

    --prompt prints the answer (streamed on a terminal); --input prints one JSON line per prompt
    {"line", "prompt", "output", "new_tokens", "finish_reason"} (--output: into that file, written
    atomically). --json prints one object instead: the answer's fields, or {"results": [...]}."""
    from peftctl import generate as gen_lib
    from peftctl.errors import InputError
    from peftctl.fsio import check_output_file

    if (prompt is None) == (input_ is None):
        raise InputError("give --prompt TEXT or --input FILE.jsonl (one of the two)")
    if overwrite and output is None:
        raise InputError("--overwrite applies to --output, which is not given")
    sampling = gen_lib.Sampling(max_new_tokens, temperature, top_p, seed)
    prompts = gen_lib.read_prompts(input_) if input_ is not None else None  # a bad line before any loading
    if output is not None:
        check_output_file(output, "--output", overwrite, hint="choose another path or pass --overwrite")
    gen = gen_lib.load(target, adapter_name=adapter, base=base, raw=raw, reporter=_reporter())
    head = {"model": gen.source, "adapter": gen.adapter}
    if prompts is None:
        prompts = [(None, prompt)]
        ids = [_placed(lambda: gen.prompt_ids(prompt), "--prompt")]
    else:
        ids = gen_lib.render_all(gen, prompts, input_)  # every line rendered before any is answered
    if input_ is None and output is None and not json_:
        streamer = _streamer(gen)
        answer = gen.generate(ids[0], sampling, streamer)
        if streamer is None:
            sys.stdout.write(answer.text + "\n")
        return
    rows = gen_lib.answer_file(gen, prompts, ids, sampling, reporter=_reporter())
    if input_ is None:
        rows = ({k: v for k, v in row.items() if k != "line"} for row in rows)
    if output is not None:
        n = gen_lib.write_jsonl(output, rows)
        _emit({**head, "output": str(output), "prompts": n}, json_,
              lambda res: _stdout().print(f"{res['prompts']} answer(s) in {res['output']}", markup=False))
    elif json_:
        results = list(rows)
        _write_json({**head, **results[0]} if input_ is None else {**head, "results": results})
    else:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()


def _placed(fn, flag: str):
    """`fn()`, with its ValueError an input error naming the flag."""
    from peftctl.errors import InputError

    try:
        return fn()
    except ValueError as e:
        raise InputError(f"{flag}: {e}") from None


@app.command()
@handled
def chat(
    target: TargetArg,
    adapter: AdapterNameOpt = None,
    base: BaseOpt = False,
    system: Annotated[str | None, typer.Option(help="A system message that opens the conversation.",
                                               show_default=False)] = None,
    max_new_tokens: MaxNewOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Talk with a run's model (or any chat model), turn by turn, rendered with its chat template.

    Reads your messages from stdin, one a line (so a conversation can be piped in); each answer goes
    to stdout. /reset forgets the conversation; /exit or end of input (Ctrl-D) ends it."""
    from peftctl import generate as gen_lib

    sampling = gen_lib.Sampling(max_new_tokens, temperature, top_p, seed)
    gen = gen_lib.load(target, adapter_name=adapter, base=base, reporter=_reporter())
    session = gen_lib.Chat(gen, sampling, system=system)
    interactive = sys.stdin.isatty()
    err = _stderr()
    if interactive:
        err.print(f"chatting with {gen.source}: /reset forgets the conversation, /exit or Ctrl-D ends it", markup=False)
    while True:
        if interactive:
            err.print("[bold]>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line:  # end of input
            if interactive:
                err.print()
            return
        text = line.rstrip("\r\n")
        command = text.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            if interactive:
                err.print("(conversation forgotten)")
            continue
        if not command:
            continue
        streamer = _streamer(gen)
        answer = session.say(text, streamer)
        if streamer is None:
            sys.stdout.write(answer.text + "\n")
            sys.stdout.flush()


@app.command()
@handled
def merge(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folder(s) (or adapter folders) to merge.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write (new or empty).")],
    weights: Annotated[str | None, typer.Option(help="Comma-separated weight per adapter (default: 1 each).")] = None,
    combination: Annotated[str | None, typer.Option(
        help="How several adapters combine: cat (exact weighted sum, the default), linear, svd, ties, "
             "dare_linear, dare_ties, magnitude_prune, or ties_svd / dare_linear_svd / dare_ties_svd / "
             "magnitude_prune_svd.")] = None,
    density: Annotated[float | None, typer.Option(help="Fraction kept by ties / dare / magnitude_prune.")] = None,
    svd_rank: Annotated[int | None, typer.Option(help="Rank of an svd combination (default: the largest).")] = None,
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="Write the (combined) adapter, not a merged model.")] = False,
    rank: Annotated[int | None, typer.Option(help="With --adapter-only: resize the adapter to this rank (SVD to shrink).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Saved dtype: float32, bfloat16 or float16 (default: the run's).")] = None,
    quantize: Annotated[str | None, typer.Option(
        help="Re-quantize the merged model with bitsandbytes: nf4 or fp4 (4-bit, double quantization) or "
             "int8; it loads quantized with from_pretrained.")] = None,
    max_shard_size: Annotated[str | None, typer.Option(
        help="Largest safetensors file of the merged model (500MB, 2GB, 4GiB or bytes; default 5GB).",
        show_default=False)] = None,
    json_: JsonOpt = False,
) -> None:
    """Merge adapters into their base model (a plain transformers folder with the tokenizer), or
    combine several into one adapter (--adapter-only). An adapter trained on a quantized base is
    merged into the base in its original precision, and compared with the model as trained."""
    from peftctl.merge import merge_runs

    _check_dtype(dtype)
    result = merge_runs(run_dirs, output, weights=_floats(weights, "--weights"), combination_type=combination,
                        density=density, svd_rank=svd_rank, adapter_only=adapter_only, rank=rank, dtype=dtype,
                        quantize=quantize, max_shard_size=max_shard_size, reporter=_reporter())
    _emit(result, json_, _render_merge)


def _render_merge(res: dict[str, Any]) -> None:
    out = _stdout()
    how = f" ({res['combination_type']}, weights {res['weights']})" if res["combination_type"] else ""
    if res["mode"] == "adapter":
        out.print(f"adapter (r={res['r']}){how} in {res['output']}")
    else:
        out.print(f"merged model{how} in {res['output']} ({res['dtype']}); max logit difference vs the "
                  f"adapter model: {res['max_logit_diff']:.3g}")
    if "vs_quantized_training_model" in res:
        d = res["vs_quantized_training_model"]
        out.print(f"vs the quantized model it was trained as: top-1 agreement {d['top1_agreement']:.1%}, KL "
                  f"{d['kl_nats_per_token']:.3g} nats/token, mean |logit difference| {d['mean_abs_logit_diff']:.3g} "
                  f"(largest {d['max_abs_logit_diff']:.3g}) over {d['tokens']} probe tokens")
    if "quantized" in res:
        d = res["quantized"]["vs_merged"]
        out.print(f"quantized ({res['quantized']['type']}); vs the unquantized merged model: top-1 agreement "
                  f"{d['top1_agreement']:.1%}, KL {d['kl_nats_per_token']:.3g} nats/token")
    if "resize" in res:
        out.print(f"resized to rank {res['resize']['r']}: largest relative error "
                  f"{res['resize']['max_relative_error']:.3g}")


def _floats(text: str | None, flag: str) -> list[float] | None:
    from peftctl.errors import InputError

    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def _check_dtype(dtype: str | None) -> None:
    from peftctl.constants import DTYPES
    from peftctl.errors import InputError

    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {dtype!r}")


@app.command()
@handled
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with the adapter.", show_default=False)],
    format_: Annotated[str, typer.Option(
        "--format", "-f", help="peft (adapter and model card), merged (transformers folder) or gguf "
                               "(one file for llama.cpp and Ollama; llama-family models).")] = "peft",
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write (new or empty).")] = ...,  # type: ignore[assignment]
    dtype: Annotated[str | None, typer.Option(
        help="For merged and gguf: float32, bfloat16 or float16 (gguf default: float16).")] = None,
    max_shard_size: Annotated[str | None, typer.Option(
        help="For merged: largest safetensors file (500MB, 2GB, 4GiB or bytes; default 5GB).",
        show_default=False)] = None,
    json_: JsonOpt = False,
) -> None:
    """Export a run: the PEFT adapter with a model card, a merged transformers model, or a GGUF file."""
    from peftctl.export import export as run_export

    _check_dtype(dtype)
    result = run_export(run_dir, format_, output, dtype=dtype, max_shard_size=max_shard_size, reporter=_reporter())

    def render(res):
        out = _stdout()
        if res["format"] == "gguf":
            out.print(f"exported (gguf, {res['dtype']}) to {res['file']} ({res['bytes'] / 2**20:.1f} MiB)")
        elif res["format"] == "merged":
            _render_merge(res)
        else:
            out.print(f"exported (peft) to {res['output']}")

    _emit(result, json_, render)


@app.command()
@handled
def inspect(
    target: Annotated[Path, typer.Argument(help="A recipe (what it would train) or a run / adapter folder (what it holds).",
                                          show_default=False)],
    memory: Annotated[bool, typer.Option(
        "--memory", help="Also estimate peak training memory (accelerator memory, per device; a CPU run's "
                         "RSS is higher) for train.batch_size × data.max_length tokens "
                         "(weights by dtype and quantization, adapter, gradients, optimizer, activations with "
                         "and without checkpointing, logits).")] = False,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Which modules a recipe adapts (no weights loaded), or what a saved adapter holds."""
    from rich.table import Table

    if target.is_dir():
        from peftctl.errors import InputError
        from peftctl.inspect import inspect_adapter

        if set_ or memory:
            flag = "--set" if set_ else "--memory"
            raise InputError(f"{flag} applies to a recipe; {target} is a folder (an adapter or run)")
        _emit(inspect_adapter(target), json_, _render_adapter)
        return
    from peftctl.inspect import inspect_recipe
    from peftctl.memory import Workload
    from peftctl.train import with_labels

    r = with_labels(_load_recipe(target, set_))  # a classification head as training sizes it
    # Every position of a full-length sequence may carry loss: the estimate is for the worst batch.
    result = inspect_recipe(r, Workload(r.train.batch_size, r.data.max_length) if memory else None)

    def render(res):
        q = res["quantization"]
        quant = "" if q is None else (f", {q['bits']}-bit {q['quant_type']}" if q["bits"] == 4 else ", 8-bit")
        table = Table(title=f"{res['method']} on {res['model']} ({res['model_type']}, {res['dtype']}{quant})")
        for col in ("module", "type", "shape", "adapter", "trainable"):
            table.add_column(col, justify="right" if col == "trainable" else "left")
        for row in res["modules"]:
            table.add_row(row["module"], row["type"], "x".join(map(str, row["shape"] or [])),
                          ", ".join(v for v in row["adapter"].values() if v), f"{row['trainable_params']:,}")
        out = _stdout()
        if res["modules"] or not r.adapter.is_prompt_learning:
            out.print(table)
        else:  # no module of the model is adapted: the trained tokens are the adapter
            out.print(f"{res['method']} on {res['model']} ({res['model_type']}, {res['dtype']}{quant}): "
                      f"{r.adapter.num_virtual_tokens} virtual tokens "
                      f"{'(keys and values in every layer)' if r.adapter.method == 'prefix_tuning' else 'before every sequence'}"
                      "; no module of the model is changed")
        out.print(f"trainable params: {res['trainable_params']:,} || all params: {res['total_params']:,} "
                  f"|| trainable%: {res['trainable_percent']:.4f}")
        if "memory" in res:
            _render_memory(out, res["memory"])

    _emit(result, json_, render)


def _cell(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _render_adapter(res: dict[str, Any]) -> None:
    from rich.table import Table

    cfg = res["config"]
    table = Table(title=f"{res['method']} adapter in {res['path']} (base: {res['base_model']})")
    # The method's own columns (LoRA: rank, lora_alpha, scaling; IA3: scales, features).
    columns = ["module", *[k for k in (res["modules"][0] if res["modules"] else {}) if k not in ("module", "params")],
               "params"]
    for col in columns:
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in res["modules"]:
        table.add_row(*(_cell(m.get(c)) for c in columns))
    out = _stdout()
    if res["modules"] or cfg.get("num_virtual_tokens") is None:
        out.print(table)
    else:  # a prompt-learning adapter changes no module: its virtual tokens are the adapter
        out.print(f"{res['method']} adapter in {res['path']} (base: {res['base_model']}): "
                  f"{cfg['num_virtual_tokens']} virtual tokens "
                  f"{'(keys and values in every layer)' if res['method'] == 'prefix_tuning' else 'before every sequence'}"
                  "; no module of the model is changed", markup=False)
    # The method's scalar options (lists and patterns are in --json).
    out.print(" ".join(f"{k}={_cell(v) if isinstance(v, float) else v}" for k, v in cfg.items()
                       if isinstance(v, bool | int | float | str)))
    if res["other_tensors"]:
        out.print("also saved: " + ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in res["other_tensors"].items()))
    out.print(f"adapter params: {res['adapter_params']:,} ({res['file_bytes'] / 2**20:.2f} MiB on disk)")
    if res["other_adapters"]:
        out.print("other adapters here: " + ", ".join(res["other_adapters"]))
    if res.get("run"):
        run = res["run"]
        loss = run.get("train_loss")
        out.print(f"run: {run.get('status')}, {run.get('steps')} steps, train loss "
                  f"{_cell(loss) if isinstance(loss, float) else loss}")


@app.command("data")
@handled
def data_(
    recipe: RecipeArg,
    show: Annotated[int | None, typer.Option("--show", help="Print the first N examples, loss tokens highlighted.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Counts, token lengths, truncated and dropped examples.")] = False,
    split: Annotated[str, typer.Option("--split", help="train or eval.")] = "train",
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """See the data as the model will: rendered examples with their loss tokens, or statistics.

    --json prints {"split", "examples": [{input_ids, labels (-100: no loss), text, ...}]} (every
    example unless --show N) and/or "stats".
    """
    from peftctl.data import report
    from peftctl.errors import InputError

    if split not in ("train", "eval"):
        raise InputError(f"--split must be train or eval, got {split!r}")
    if show is not None and show < 0:
        raise InputError("--show must be >= 0")
    r = _load_recipe(recipe, set_)
    if split == "eval" and r.data.eval is None and r.data.eval_split is None:
        raise InputError("--split eval: the recipe has no eval data (set data.eval or data.eval_split)")
    data, tokenizer, labels = report.load(r, _reporter())
    report.split_examples(data, split)
    if json_:
        head = {"split": split}
        if stats:
            head["stats"] = report.stats(data)
        if stats and show is None:
            _write_json(head)
            return
        # Streamed: every example of a large data set would not fit in one string.
        _state["emitted"] = True
        sys.stdout.write(json.dumps(head)[:-1] + ', "examples": [')
        for i, ex in enumerate(report.examples_json(data, tokenizer, split, show, labels)):
            sys.stdout.write(("," if i else "") + json.dumps(ex))
        sys.stdout.write("]}\n")
        return
    out = _stdout()
    if show is not None or not stats:
        _render_examples(out, data, tokenizer, split, 3 if show is None else show, labels)
    if stats:
        _render_stats(out, report.stats(data))


def _render_examples(out, data, tokenizer, split: str, n: int, labels: list[str] | None = None) -> None:
    from rich.text import Text

    from peftctl.data import report

    examples = report.split_examples(data, split)
    plain = not out.is_terminal
    out.print(f"{split}: {len(examples):,} examples; loss tokens are shown "
              + ("between ⟦ and ⟧" if plain else "[bold green]in green[/bold green], the rest dimmed"))
    for k in range(min(n, len(examples))):
        ex = examples[k]
        parts = [("", ex)] + ([("rejected", ex.rejected)] if ex.rejected is not None else [])
        out.print(f"── #{k + 1} {ex.source} · {len(ex.input_ids)} tokens · {ex.num_loss_tokens} with loss"
                  + (" · truncated" if ex.truncated else ""), style="bold", markup=False)
        if getattr(ex, "task", None) == "token_cls":  # each labelled token with its tag
            text = Text()
            for piece, tag in report.tags(ex, tokenizer, labels):
                if tag is None:
                    text.append(piece, style="dim")
                else:
                    text.append(f"⟦{piece}/{tag}⟧" if plain else f"{piece}/{tag}", style="bold green")
            out.print(text)
            continue
        goal = report.target(ex, labels)
        for name, e in parts:
            text = Text(f"[{name}]\n" if name else "")
            for ids, loss in report.runs(e):
                piece = tokenizer.decode(ids)
                if plain and loss:
                    piece = f"⟦{piece}⟧"
                text.append(piece, style="bold green" if loss else "dim")
            out.print(text)
        if goal is not None:
            out.print(Text.assemble(("→ label " if ex.task == "seq_cls" else "→ target ", "bold"),
                                    (f"⟦{goal}⟧" if plain else goal, "bold green")))


def _render_stats(out, stats: dict) -> None:
    from rich.table import Table

    for name, s in stats.items():
        origin = (f"from {s['rows']:,} rows of {s['sources']} source(s)" if s["sources"]
                  else "held out from the training examples (eval_split)")
        out.print(f"[bold]{name}[/bold]: {s['examples']:,} examples {origin}; {s['tokens']:,} tokens, "
                  f"{s['loss_tokens']:,} with loss")
        out.print(f"  truncated {s['truncated']:,} · dropped too long {s['dropped_too_long']:,} · dropped "
                  f"without loss tokens {s['dropped_no_loss']:,}"
                  + (f" · from cache {s['from_cache']}/{s['sources']}" if s["sources"] else ""))
        if s.get("identical_pairs"):
            out.print(f"  [yellow]warning[/yellow]: {s['identical_pairs']:,} preference pairs have identical chosen "
                      "and rejected answers (kept, as TRL keeps them; their loss cannot move)")
        if s.get("packed_sequences") is not None:
            out.print(f"  packed into {s['packed_sequences']:,} sequences, {100 * s['packing_fill']:.1f}% filled")
        if "length" in s:
            ln = s["length"]
            out.print(f"  tokens per example: min {ln['min']} · median {ln['median']} · mean {ln['mean']} · "
                      f"p95 {ln['p95']} · max {ln['max']}")
            table = Table(box=None, show_header=True, pad_edge=False)
            table.add_column("tokens", justify="right")
            table.add_column("examples", justify="right")
            table.add_column("")
            peak = max(b["count"] for b in s["histogram"]) or 1
            for b in s["histogram"]:
                table.add_row(f"{b['from']}–{b['to']}", f"{b['count']:,}", "█" * round(30 * b["count"] / peak))
            out.print(table)


@app.command()
@handled
def prepare(recipe: RecipeArg, set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """Tokenize a recipe's data into the cache ahead of training (no model weights loaded)."""
    from peftctl.data.report import prepare as run_prepare

    r = _load_recipe(recipe, set_)
    result = run_prepare(r, _reporter())

    def render(res):
        out = _stdout()
        for t in res["tables"]:
            out.print(f"{t['split']}: {t['source']}: {t['examples']:,} examples"
                      + (f" → {t['folder']}" if t["folder"] else ""))
        cached = sum(s["from_cache"] for s in res["stats"].values())
        total = sum(s["sources"] for s in res["stats"].values())
        out.print(f"done in {res['seconds']:.1f}s ({cached} of {total} source(s) were already cached)"
                  if res["cache"] else f"done in {res['seconds']:.1f}s (data.cache is off: nothing kept)")

    _emit(result, json_, render)


recipe_app = typer.Typer(help="Recipes from other tools' configs.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def _translate(tool: str, config: Path, output: Path | None, json_: bool) -> None:
    from peftctl.recipe.translate import translate_file

    result = translate_file(config, tool, output)

    def render(res):
        err = _stderr()
        for d in res["dropped"]:
            err.print(f"dropped {d['key']}: {d['reason']}", markup=False)
        for note in res["notes"]:
            err.print(f"note: {note}", markup=False)
        if res["output"] is None:
            sys.stdout.write(res["yaml"])
        else:
            err.print(f"wrote {res['output']} ({len(res['dropped'])} option(s) dropped); check it with "
                      f"peftctl validate {res['output']}", markup=False)

    _emit(result, json_, render)


ConfigArg = Annotated[Path, typer.Argument(help="The tool's YAML training config.", show_default=False)]
RecipeOut = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Write the recipe to this new file (default: print it).", show_default=False)]


@recipe_app.command("from-axolotl")
@handled
def from_axolotl(config: ConfigArg, output: RecipeOut = None, json_: JsonOpt = False) -> None:
    """Translate an axolotl config into a recipe: what has an equivalent, the rest listed as dropped."""
    _translate("axolotl", config, output, json_)


@recipe_app.command("from-llamafactory")
@handled
def from_llamafactory(config: ConfigArg, output: RecipeOut = None, json_: JsonOpt = False) -> None:
    """Translate a LLaMA-Factory config into a recipe (datasets looked up in dataset_dir/dataset_info.json)."""
    _translate("llamafactory", config, output, json_)


@app.command()
def schema() -> None:
    """Print the recipe reference (every field, its type, default and meaning) as Markdown."""
    from peftctl.recipe import reference_markdown

    sys.stdout.write(reference_markdown() + "\n")


def main() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("peftctl")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    app()


if __name__ == "__main__":
    main()
