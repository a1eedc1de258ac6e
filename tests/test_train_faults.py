"""The training loop's faults and bookkeeping, end to end: kills before the first checkpoint, two
processes on one run folder, a full disk and the file-size limit, a collapsed model, file modes
under the user's umask, the learning rate and epochs as logged and counted, resuming with another
batch geometry, and finished runs that stay finished."""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from clirun import gloo_env, run, run_json

from peftctl.fsio import disk_full_reason
from peftctl.train.lock import LOCK_NAME


def spawn(*args, preexec_fn=None) -> subprocess.Popen:
    # The environment as it is now (conftest points PEFTCTL_CACHE at the session's private cache).
    return subprocess.Popen([sys.executable, "-m", "peftctl", *map(str, args)], env={**os.environ},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written
    return out


def train_records(run_dir: Path) -> list[dict]:
    return [m for m in metrics(run_dir) if "loss" in m]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}):\n{err[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under `folder` (the folder itself included): mtime, mode and a file's bytes."""
    out = {}
    for p in [folder, *sorted(folder.rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_mtime_ns, st.st_mode, p.read_bytes() if p.is_file() else None)
    return out


# ---- kills, locks ---------------------------------------------------------------------------------


def test_a_kill_before_the_first_checkpoint_is_started_again_by_resume_auto(make_recipe, tmp_path):
    """SIGKILL with no checkpoint written yet (save_every 500), and a half-built checkpoint folder:
    `--resume auto` starts the run again there (removing what the attempt left) instead of refusing,
    so a job that always passes it survives any kill. The dead process's lock does not hold."""
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 5, "save_every": 500, "log_every": 1})
    proc = spawn("train", recipe, "--set", "train.max_steps=100000")
    wait_for(lambda: len(train_records(out)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    first_attempt = train_records(out)
    # What a kill during the first checkpoint leaves: its temporary folder.
    partial = out / "checkpoints" / ".step-000500.k1ll3d.tmp"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    assert (out / LOCK_NAME).exists() and not (out / "summary.json").exists()

    run("train", recipe, code=2)  # without --resume a used folder is still refused
    r = run("train", recipe, "--resume", "auto", "--json")
    s = json.loads(r.stdout)
    assert s["status"] == "completed" and s["steps"] == 5 and s["resumed_from"] is None
    assert "starting the run again from the beginning" in r.stderr and "checkpoints" in r.stderr
    records = train_records(out)
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5]  # one run's metrics, each step once
    # the same run: the same seeded losses as the killed attempt's first steps
    assert [m["loss"] for m in records[:2]] == [m["loss"] for m in first_attempt[:2]]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005"]

    # A folder that is not a run's is never cleared: refused, untouched.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = run("train", recipe, "--resume", "auto", "--set", f"output.dir={other}", code=2)
    assert "holds no checkpoint" in r.stderr and [p.name for p in other.iterdir()] == ["notes.txt"]


def test_a_resume_checks_the_runs_metrics_lines_before_changing_anything(make_recipe, tmp_path):
    """A line of metrics.jsonl that is not a metrics record stops a resume (exit 2, file and line)
    with the folder untouched; the half line a kill leaves at the end is dropped."""
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 2, "save_every": 1, "log_every": 1})
    run_json("train", recipe)
    good = (out / "metrics.jsonl").read_text()
    n = len(good.splitlines())
    for garbage, what in (("[1, 2]", f"line {n + 1} is not a JSON object"), ("\x00\x01", f"line {n + 1} is not JSON"),
                          ('{"step": "abc"}', f"line {n + 1}: step must be an integer")):
        (out / "metrics.jsonl").write_text(good + garbage + "\n")
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}
        r = run("train", recipe, "--resume", "auto", "--set", "train.max_steps=3", code=2)
        assert f"{out / 'metrics.jsonl'}" in r.stderr and what in r.stderr and "Traceback" not in r.stderr
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME} == before
    (out / "metrics.jsonl").write_text(good + '{"step": 3, "lo')  # a killed writer's half line
    run_json("train", recipe, "--resume", "auto", "--set", "train.max_steps=3")
    assert [m["step"] for m in train_records(out)] == [1, 2, 3]


def test_a_second_train_on_a_folder_in_use_is_refused_naming_the_holder(make_recipe, tmp_path):
    """Two `--resume auto` on one run at once: the second is refused (exit 2) with the folder and
    the holder's pid, and touches nothing; so is a fresh run that meets the lock only when it
    creates the folder (it raced another into a new one)."""
    from peftctl.train.lock import RunLock

    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 2, "save_every": 2, "log_every": 1})
    run_json("train", recipe)
    holder = spawn("train", recipe, "--resume", "auto", "--set", "train.max_steps=100000")
    wait_for(lambda: len(train_records(out)) > 2, holder)  # it resumed and trains
    before = (out / "metrics.jsonl").read_bytes()
    r = run("train", recipe, "--resume", "auto", code=2)
    assert f"output.dir {out} is in use by another peftctl train (pid {holder.pid})" in r.stderr
    r = run("train", recipe, code=2)  # without --resume: the same reason, not "not empty"
    assert f"(pid {holder.pid})" in r.stderr
    r = run("train", recipe, "--resume", "auto", "--dry-run", code=2)  # the dry run refuses alike
    assert f"(pid {holder.pid})" in r.stderr
    (out / LOCK_NAME).unlink()  # the folder itself is locked too: deleting the lock file lets no one in
    r = run("train", recipe, "--resume", "auto", code=2)
    assert f"output.dir {out} is in use by another peftctl train" in r.stderr
    holder.send_signal(signal.SIGTERM)
    holder.communicate(timeout=120)
    assert holder.returncode == 143
    assert (out / "metrics.jsonl").read_bytes()[: len(before)] == before
    steps = [m["step"] for m in train_records(out)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: each step once, in order

    # The race into a new folder: the other run has just created it and holds its lock (here this
    # test process does, through another descriptor, as a second process would).
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    other = RunLock(fresh)
    other.acquire()
    try:
        r = run("train", recipe, "--set", f"output.dir={fresh}", code=2)
    finally:
        other.release()
    assert f"output.dir {fresh} is in use by another peftctl train (pid {os.getpid()})" in r.stderr
    assert [p.name for p in fresh.iterdir()] == [LOCK_NAME]  # nothing of the refused run


# ---- the disk -------------------------------------------------------------------------------------


FULL_WRITES = """
import json, os, stat, subprocess, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from peftctl.fsio import disk_full_reason
from peftctl.train.checkpoint import _save

where = sys.argv[1]
if where == "/dev/full":
    target = where
else:  # a small tmpfs (in a user namespace), filled up
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "none", where], check=True)
    try:
        with open(os.path.join(where, "filler"), "wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
    except OSError:
        pass
    target = os.path.join(where, "out")

def plain():
    with open(target, "wb") as f:
        f.write(bytes(100000))
        f.flush()

tensors = {"w": torch.zeros(100000)}
reasons = []
for fn in (plain, lambda: _save(tensors, Path(target)), lambda: save_file(tensors, target)):
    try:
        fn()
        reasons.append("the write did not fail")
    except Exception as e:
        reasons.append(disk_full_reason(e))
print(json.dumps(reasons))
"""


def test_disk_full_and_file_size_errors_are_recognised_through_real_failing_writes(tmp_path):
    """ENOSPC through each writer a run uses (plain files, torch.save to a file object,
    safetensors) on /dev/full or a small full file system, and EFBIG from the file-size limit: each
    is said in words."""
    script = tmp_path / "full.py"
    script.write_text(FULL_WRITES)
    full = Path("/dev/full")
    if full.exists() and stat.S_ISCHR(full.stat().st_mode):
        cmd = [sys.executable, str(script), "/dev/full"]
    elif shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        (tmp_path / "mnt").mkdir()
        cmd = ["unshare", "-rm", sys.executable, str(script), str(tmp_path / "mnt")]
    else:
        pytest.skip("neither /dev/full nor unprivileged user namespaces (unshare -rm): no disk to fill")
    p = subprocess.run(cmd, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout) == ["no space left on the device"] * 3

    assert disk_full_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "the disk quota is used up"
    assert disk_full_reason(ValueError("no disk involved")) is None
    limited = textwrap.dedent(f"""
        import resource, torch
        from pathlib import Path
        from peftctl.fsio import disk_full_reason
        from peftctl.train.checkpoint import _save
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            _save({{"w": torch.zeros(10000)}}, Path({str(tmp_path / "big.pt")!r}))
        except Exception as e:
            print(disk_full_reason(e))
    """)
    p = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "a file outgrew the file-size limit (ulimit -f: 4096 bytes)", p.stderr[-2000:]


# A run whose checkpoint (a 64-rank adapter on every linear layer: about 460 KB, and twice that of
# optimizer state) cannot be written, while recipe, metrics and summary are a few KB.
BIG_ADAPTER = {"r": 64, "lora_alpha": 64, "target_modules": "all-linear"}


def test_the_file_size_limit_is_named_and_the_summary_written(make_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), adapter=BIG_ADAPTER, train={"max_steps": 6, "save_every": 2})
    run("data", recipe, "--stats")  # the data cache built here, outside the limit
    limit = 300_000

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = spawn("train", recipe, preexec_fn=limit_files)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    reason = f"a file outgrew the file-size limit (ulimit -f: {limit} bytes)"
    assert f"training failed after step 2: {reason} (writing into {out})" in stderr
    assert "unexpected pos" not in stderr and "Traceback" not in stderr
    s = summary(out)
    assert s["status"] == "failed" and reason in s["error"] and s["steps"] == 2
    assert not list((out / "checkpoints").iterdir())  # the half-written checkpoint was removed


DISK_FULL_DRIVER = """
import json, os, subprocess, sys, time
mnt, recipe, result = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", mnt], check=True)
out = os.path.join(mnt, "run")
proc = subprocess.Popen([sys.executable, "-m", "peftctl", "train", recipe, "--set", f"output.dir={out}"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
metrics = os.path.join(out, "metrics.jsonl")
while proc.poll() is None and not (os.path.exists(metrics) and open(metrics).read().count("\\n") >= 2):
    time.sleep(0.01)
try:  # the disk fills up (another program's doing) while the run trains
    with open(os.path.join(mnt, "filler"), "wb") as f:
        while True:
            f.write(b"\\0" * 4096)
            f.flush()
except OSError:
    pass
_, stderr = proc.communicate()
s = os.path.join(out, "summary.json")
json.dump({"code": proc.returncode, "stderr": stderr,
           "summary": json.load(open(s)) if os.path.exists(s) else None}, open(result, "w"))
"""


def test_a_full_disk_is_named_and_the_summary_still_written(make_recipe, tmp_path):
    """A real full disk: a 1 MiB tmpfs mounted in a user namespace, filled while the run trains."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged user namespaces here (unshare -rm): cannot mount a small file system")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    recipe = make_recipe(out="unused", train={"max_steps": 100000, "save_every": None, "log_every": 1})
    run("data", recipe, "--stats")
    driver = tmp_path / "driver.py"
    driver.write_text(DISK_FULL_DRIVER)
    result = tmp_path / "result.json"
    p = subprocess.run(["unshare", "-rm", sys.executable, str(driver), str(mnt), str(recipe), str(result)],
                       env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and result.exists(), p.stderr[-3000:]
    res = json.loads(result.read_text())
    assert res["code"] == 1, res["stderr"][-3000:]
    assert "no space left on the device (writing into" in res["stderr"] and "Traceback" not in res["stderr"]
    s = res["summary"]  # written after the run gave back the space its lock file held
    assert s is not None and s["status"] == "failed" and "no space left on the device" in s["error"]


# ---- a collapsed model ----------------------------------------------------------------------------


def test_a_collapsed_run_stops_as_diverged_naming_the_learning_rate(make_recipe, tmp_path):
    """SGD at lr 1e4 (a typo) without clipping: after step 2 the activations saturate, every
    gradient is exactly 0 and the loss sits at ln(320), the tiny model's vocabulary, with no NaN."""
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), adapter={"target_modules": "all-linear"},
                         train={"max_steps": 40, "optimizer": "sgd", "lr": 1e4, "max_grad_norm": None,
                                "log_every": 1, "save_every": 2})
    r = run("train", recipe, code=1)
    s = summary(out)
    assert s["status"] == "diverged" and s["stop_reason"] == "collapsed" and s["steps"] < 40
    records = train_records(out)
    tail = records[-5:]
    assert all(m["grad_norm"] == 0.0 and m["loss"] == pytest.approx(math.log(320), rel=1e-4) for m in tail)
    assert records[-6]["grad_norm"] != 0.0  # stopped on the 5th such step, not later
    since = tail[0]["step"]
    assert f"training collapsed at step {s['steps']}: since step {since} the gradient norm" in r.stderr
    assert "learning rate (train.lr 10000) is most likely far too high" in r.stderr
    # Step 2's update made the model that step 3 found collapsed: its checkpoint is no good, and
    # none was written while the collapse was suspected (pruning would have removed older ones).
    assert since == 3 and "no checkpoint from before the collapse is left" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not (out / "adapter_model.safetensors").exists() and "Traceback" not in r.stderr


def test_the_collapse_signature_needs_both_a_zero_gradient_and_uniform_predictions():
    from peftctl.train.loop import looks_collapsed

    uniform = math.log(320)
    assert looks_collapsed(0.0, uniform, 320)
    assert not looks_collapsed(1e-12, uniform, 320)  # converged runs have small, never zero, gradients
    assert not looks_collapsed(0.0, 0.5, 320)  # zero gradient but a confident model: not this fault
    assert not looks_collapsed(0.0, uniform * 1.01, 320)


# ---- file modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_and_folders_get_the_users_umask(make_recipe, tmp_path, mask):
    out, merged = tmp_path / "run", tmp_path / "merged"
    recipe = make_recipe(out=str(out), train={"max_steps": 2, "save_every": 2})
    old = os.umask(mask)
    try:
        run_json("train", recipe)
        run_json("merge", out, "-o", merged)
    finally:
        os.umask(old)
    checked = [out, out / "checkpoints", *out.glob("checkpoints/*"), *out.glob("checkpoints/*/*"),
               *out.glob("*.json"), *out.glob("*.yaml"), *out.glob("*.jsonl"), *out.glob("*.safetensors"),
               merged, *merged.iterdir()]
    assert {p.name for p in checked} >= {"adapter_model.safetensors", "adapter_config.json", "summary.json",
                                        "recipe.yaml", "optimizer.pt", "peftctl_state.json", "model.safetensors"}
    for p in checked:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, (str(p), oct(p.stat().st_mode & 0o777), oct(want))


# ---- what is logged and counted -----------------------------------------------------------------


@pytest.mark.parametrize("scheduler, factors", [
    # warmup 3 of 6 steps: step k (1-based) uses (k)/3 while warming up, then the schedule at
    # progress (k - 1 - 3) / (6 - 3); the rate 0 would be step 7's
    ("linear", [1 / 3, 2 / 3, 1.0, 1.0, 2 / 3, 1 / 3]),
    ("cosine", [1 / 3, 2 / 3, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]),
])
def test_each_metrics_line_gives_what_its_step_used(make_recipe, tmp_path, scheduler, factors):
    out = tmp_path / "run"
    recipe = make_recipe(out=str(out), train={"max_steps": 6, "optimizer": "sgd", "lr": 0.1, "scheduler": scheduler,
                                              "warmup_steps": 3, "log_every": 1, "save_every": None})
    s = run_json("train", recipe)
    records = train_records(out)
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in records] == pytest.approx([0.1 * f for f in factors], rel=1e-12)
    # 4 of the 48 examples per step: the epoch reached when the step ended
    assert [m["epoch"] for m in records] == [round(4 * k / 48, 4) for k in range(1, 7)]
    assert sum(m["loss_tokens"] for m in records) == s["loss_tokens_seen"]
    assert all(m["grad_norm"] > 0 for m in records)
    assert [m["elapsed_s"] for m in records] == sorted(m["elapsed_s"] for m in records)
    if scheduler == "linear":
        # log_every 4: the loss is the window's mean per token; lr and grad_norm are the logged step's
        again = tmp_path / "again"
        run_json("train", recipe, "--set", f"output.dir={again}", "--set", "train.log_every=4")
        (at4, at6) = train_records(again)
        assert (at4["step"], at6["step"]) == (4, 6) and at4["lr"] == records[3]["lr"] and at6["lr"] == records[5]["lr"]
        assert at4["grad_norm"] == records[3]["grad_norm"]
        window = records[:4]
        mean = sum(m["loss"] * m["loss_tokens"] for m in window) / sum(m["loss_tokens"] for m in window)
        assert at4["loss"] == pytest.approx(mean, rel=1e-12) and at4["loss_tokens"] == sum(m["loss_tokens"] for m in window)


def test_epochs_train_every_example_exactly_n_times_in_any_geometry(make_recipe, tmp_path):
    """48 examples, batch 5: a micro-batch ends with each epoch (the last of an epoch has 3), and
    the run's last step may be shorter than grad_accum. summary.json's epochs is exact."""
    for epochs, accum, steps in ((1, 2, 5), (2, 3, 7)):
        out = tmp_path / f"e{epochs}"
        recipe = make_recipe(out=str(out), train={"max_steps": None, "epochs": epochs, "batch_size": 5,
                                                  "grad_accum": accum, "save_every": None, "log_every": 1})
        plan = run_json("train", recipe, "--dry-run")
        assert plan["steps"] == steps and plan["epochs"] == epochs
        s = run_json("train", recipe)
        assert s["steps"] == steps and s["epochs"] == epochs and s["examples_seen"] == 48 * epochs
        assert train_records(out)[-1]["epoch"] == epochs


def test_data_stream_draws_each_example_once_per_epoch_on_any_number_of_processes():
    """On 3 processes, batch 2, 7 examples over 2 epochs: each process gets its share of each
    global micro-batch; where a share is empty, a stand-in of weight 0 keeps the process in step."""
    from peftctl.data import Example
    from peftctl.train.loop import DataStream, micro_batches_between

    examples = [Example(input_ids=[1, 2, 3 + i], labels=[1, 2, 3 + i]) for i in range(7)]
    streams = [DataStream(examples, 2, seed=0, rank=r, world=3, pad_id=0, limit=14) for r in range(3)]
    drawn, count = [], 0
    while True:
        batches = [s.next() for s in streams]
        if batches[0] is None:
            assert all(b is None for b in batches)
            break
        count += 1
        for b in batches:
            if b.weight:
                drawn += [int(x) for x in b.batch["input_ids"][:, 2]]
            else:
                assert b.loss_tokens == b.input_tokens == 0
    assert sorted(drawn) == sorted(list(range(3, 10)) * 2)
    assert count == micro_batches_between(7, 6, 0, 14) == 4  # 6 + 1 per epoch


def test_two_processes_train_an_odd_epoch_as_one_process_does(tmp_path, tiny_model_dir):
    """49 examples, one epoch, batch 2 on each of 2 processes: the last global micro-batch holds one
    example, so the second process runs a stand-in of weight 0. Every example counts once: the
    same losses and adapter as one process with batch 4 (float32 sums in another order: 1e-5)."""
    from safetensors.torch import load_file
    from tiny import recipe_text, write_chat_data

    data = write_chat_data(tmp_path / "train49.jsonl", 49, seed=4)
    train = {"max_steps": None, "epochs": 1, "scheduler": "constant", "save_every": None, "log_every": 1}
    outs = {}
    for world, batch in ((1, 4), (2, 2)):
        outs[world] = out = tmp_path / f"w{world}"
        recipe = tmp_path / f"w{world}.yaml"
        recipe.write_text(recipe_text(tiny_model_dir, str(data), None, str(out), train={**train, "batch_size": batch}))
        if world == 1:
            s = run_json("train", recipe)
        else:
            p = subprocess.run([sys.executable, "-m", "peftctl", "train", str(recipe), "--num-processes", "2", "--json"],
                               env=gloo_env(), capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr[-3000:]
            s = json.loads(p.stdout)
        assert s["steps"] == 13 and s["epochs"] == 1.0 and s["examples_seen"] == 49
    one, two = train_records(outs[1]), train_records(outs[2])
    assert [m["loss_tokens"] for m in one] == [m["loss_tokens"] for m in two]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    a, b = (load_file(outs[w] / "adapter_model.safetensors") for w in (1, 2))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_resume_with_another_batch_geometry_trains_each_example_exactly_once(tmp_path, tiny_model_dir, monkeypatch):
    """200 rows, epochs 1, batch 2 × grad_accum 2, stopped after step 3 (SIGTERM), resumed with
    grad_accum 1: the rest of the epoch at the new size, each example once (not 206 of them)."""
    from tiny import recipe_text, write_chat_data

    from peftctl.train import loop

    data = write_chat_data(tmp_path / "train200.jsonl", 200, seed=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_model_dir, str(data), None, str(tmp_path / "run"),
                                  train={"max_steps": None, "epochs": 1, "batch_size": 2, "grad_accum": 2,
                                         "save_every": None, "log_every": 10}))
    seen: list[str] = []
    collate = loop.collate

    def recording(examples, pad_id):  # observes what the loop draws, then does the real work
        seen.extend(e.source for e in examples)
        # The loop draws a step's micro-batches ahead, during the step before: 16 drawn means
        # step 4's are, during step 3. Stop after step 3, as a scheduler would.
        if len(seen) == 16:
            os.kill(os.getpid(), signal.SIGTERM)
        return collate(examples, pad_id)

    monkeypatch.setattr(loop, "collate", recording)
    run("train", recipe, code=143)
    assert summary(tmp_path / "run")["steps"] == 3 and len(seen) == 16
    r = run("train", recipe, "--resume", "auto", "--set", "train.grad_accum=1", "--json")
    s = json.loads(r.stdout)
    assert "train.grad_accum: 2 -> 1" in r.stderr
    # The 4 examples drawn ahead for step 4 were not trained: the resumed run draws them first.
    assert seen[16:20] == seen[12:16]
    trained = seen[:12] + seen[16:]
    assert len(trained) == 200 and len(set(trained)) == 200  # the 200 rows, each once
    assert s["steps"] == 3 + 188 // 2 and s["epochs"] == 1.0 and s["examples_seen"] == 200


# ---- finished runs --------------------------------------------------------------------------------


def test_a_finished_run_trains_nothing_more_and_touches_no_file(make_recipe, tmp_path):
    out = tmp_path / "run"
    # Early stopping: a threshold no eval can beat, so the run stops after 3 evaluations.
    recipe = make_recipe(out=str(out), train={"max_steps": 50, "eval_every": 2, "early_stopping_patience": 2,
                                              "early_stopping_threshold": 100.0, "save_every": None})
    s = run_json("train", recipe)
    assert s["stop_reason"] == "early_stopping" and s["steps"] == 6
    before = snapshot(out)
    for extra in ([], ["--set", "train.max_steps=80"]):  # more steps do not lift early stopping
        r = run("train", recipe, "--resume", "auto", *extra, "--json")
        again = json.loads(r.stdout)
        assert again["nothing_trained"] == "it stopped early at step 6: eval_loss had not improved for 2 evaluations"
        assert again["steps"] == 6 and "already finished" in r.stderr
        assert snapshot(out) == before
    plan = run_json("train", recipe, "--resume", "auto", "--dry-run")
    assert plan["nothing_to_train"].startswith("it stopped early at step 6")

    # A run that completed without checkpoints: finished as it is; asking for more cannot be done.
    done = tmp_path / "done"
    recipe = make_recipe(out=str(done), train={"max_steps": 3, "save_every": None})
    run_json("train", recipe)
    before = snapshot(done)
    assert run_json("train", recipe, "--resume", "auto")["nothing_trained"] == "it completed 3 steps (0.25 epochs)"
    r = run("train", recipe, "--resume", "auto", "--set", "train.max_steps=5", code=2)
    assert "completed without checkpoints" in r.stderr
    assert snapshot(done) == before


def test_steps_and_examples_are_counted_in_closed_form(make_recipe):
    """The plan's counts equal a micro-batch-by-micro-batch walk (the reference below) and take no
    time for a huge run; epochs and max_steps beyond any run are refused by validate (exit 2, line)."""
    import random
    import types

    from peftctl.train import loop

    def walk(n, per, start, stop):  # micro-batches from `start` to `stop`, one epoch segment at a time
        count, pos = 0, start
        while pos < stop:
            seg_end = min((pos // n + 1) * n, stop)
            count, pos = count + -(-(seg_end - pos) // per), seg_end
        return count

    def drawn(cfg, n, per, steps):  # examples that `steps` steps draw, micro-batch by micro-batch
        target, pos = loop.target_examples(cfg, n), 0
        for _ in range(steps * cfg.grad_accum):
            if target is not None and pos >= target:
                break
            pos += min(per, n - pos % n)
        return pos if target is None else min(pos, target)

    rng = random.Random(0)
    for _ in range(3000):
        n, per = rng.randint(1, 30), rng.randint(1, 12)
        start, stop = rng.randint(0, 200), rng.randint(0, 300)
        assert loop.micro_batches_between(n, per, start, stop) == walk(n, per, start, stop)
        cfg = types.SimpleNamespace(max_steps=rng.choice([None, 5]), epochs=rng.choice([None, 1.0, 2.5, 0.3]),
                                    batch_size=per, grad_accum=rng.randint(1, 3))
        steps = rng.randint(0, 60)
        assert loop.examples_in_steps(cfg, n, 1, steps) == drawn(cfg, n, per, steps)
    huge = types.SimpleNamespace(max_steps=None, epochs=1e6, batch_size=3, grad_accum=2)
    t0 = time.monotonic()
    # 10**6 epochs of ceil(10**6 / 6) micro-batches (none crosses an epoch's end), 2 to a step
    assert loop.total_steps(huge, 10**6, 2) == -(-(10**6 * -(-(10**6) // 6)) // 2)
    assert time.monotonic() - t0 < 1.0
    for field, value in (("epochs", "1e300"), ("max_steps", str(2**63 - 1))):
        recipe = make_recipe(train={field: value})
        r = run("validate", recipe, code=2)
        assert f"train.{field}: must be <=" in r.stderr
