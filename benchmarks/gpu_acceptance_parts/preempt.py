"""Part (c): preemption on the real launcher, and a bit-identical resume.

``torchrun --standalone --nproc_per_node 1`` runs the trainer (``bench.run.train``, DeepSpeed ZeRO-2 bf16, NCCL) and
gets SIGUSR1 after some steps; it must write its checkpoint, leave ``PREEMPTED`` and exit with ``EXIT_REQUEUE``
(torchrun reports the worker's code in its failure summary and exits 1 itself, which is why ``slurm/job.sbatch`` reads
the marker); a second start resumes it, and its export, final checkpoint and loss curve must equal those of an
uninterrupted run (started alongside) bit for bit; on the GPU a second uninterrupted run is a control, so a difference
is told apart from kernel nondeterminism. The trainer runs with ``torch.use_deterministic_algorithms(True,
warn_only=True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (the entry script's ``--deterministic-trainer`` mode, which
calls ``bench.run.train.main``), so that kernels with a deterministic variant use it (ops without one only warn): what
is compared is the resume, not the kernels, and the control run shows whether the kernels were deterministic enough.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpu_acceptance_parts.common import ENTRY_SCRIPT, REPO_ROOT, PartContext, child_pids, kill_tree


def worker_exit_code(torchrun_stderr: str) -> int | None:
    """The first failed worker's exit code from torchrun's failure summary (``exitcode  : 75 (pid: 123)``); torchrun
    itself exits 1 whatever the worker's code was."""
    match = re.search(r"^\s*exitcode\s*:\s*(-?\d+)", torchrun_stderr, flags=re.M)
    return int(match.group(1)) if match else None


def flatten_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, tensor) of every tensor inside nested dicts/lists/tuples (checkpoint files), in a stable order."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from flatten_tensors(obj[key], f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from flatten_tensors(item, f"{prefix}[{i}]")


def compare_tensor_files(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names of those that differ) between two .safetensors or torch files."""
    import torch
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, Any]:
        if path.suffix == ".safetensors":
            return dict(flatten_tensors(load_file(str(path))))
        return dict(flatten_tensors(torch.load(path, map_location="cpu", weights_only=False)))

    ta, tb = load(a), load(b)
    differ = sorted(set(ta) ^ set(tb))
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            differ.append(key)
    return len(set(ta) | set(tb)), differ


def trainer_overrides(plan: dict[str, Any], device: str) -> list[str]:
    return [f"--model.arch={plan['arch']}", "--model.in_channels=3", f"--model.input_size={plan['image_size']}",
            f"--data.image_size={plan['image_size']}", f"--data.per_class={plan['per_class']}",
            f"--schedule.global_batch={plan['global_batch']}", f"--schedule.steps={plan['steps']}",
            f"--schedule.ckpt_every={plan['steps']}", "--schedule.log_every=1", "--schedule.ema_decay=0.99",
            "--method.stage=ancestry", "--engine.backend=deepspeed", "--engine.zero_stage=2",
            f"--engine.precision={plan['precision']}",
            f"--engine.dist_backend={'nccl' if device == 'cuda' else 'gloo'}"]


def torchrun_command(overrides: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            str(ENTRY_SCRIPT), "--deterministic-trainer", *overrides, f"--run.out_dir={out}"]


def deterministic_trainer(argv: list[str]) -> int:
    """The trainer's own entry (``bench.run.train.main``) with deterministic kernels (see part (c))."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    from bench.run.train import main as train_main

    return train_main(argv)


def _run_dir(out: Path) -> Path | None:
    runs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
    return runs[0] if len(runs) == 1 else None


def _logged_steps(out: Path) -> int:
    run = _run_dir(out)
    log = run / "train.jsonl" if run else None
    return len(log.read_text().splitlines()) if log and log.is_file() else 0


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train.jsonl").read_text().splitlines()]


def compare_runs(run_a: Path, run_b: Path, steps: int) -> list[tuple[str, str, bool]]:
    """(what, observed, equal) for the export, every tensor file of the final checkpoint and the loss curve of two
    finished runs."""
    out = []
    n, differ = compare_tensor_files(run_a / "export.safetensors", run_b / "export.safetensors")
    out.append(("export.safetensors", f"{n - len(differ)}/{n} tensors equal"
                + (f"; differ: {differ[:4]}" if differ else ""), n > 0 and not differ))
    final = f"checkpoints/{steps:07d}"
    files = sorted(p.relative_to(run_a / final) for p in (run_a / final).rglob("*")
                   if p.suffix in (".pt", ".safetensors"))
    total, bad = 0, []
    for rel in files:
        if not (run_b / final / rel).is_file():
            bad.append(f"{rel} missing")
            continue
        n, differ = compare_tensor_files(run_a / final / rel, run_b / final / rel)
        total += n
        bad += [f"{rel}:{key}" for key in differ]
    out.append((f"final checkpoint ({final}: model, ZeRO-2 optimizer, EMA)",
                f"{total - len(bad)}/{total} tensors equal in {len(files)} files"
                + (f"; differ: {bad[:4]}" if bad else ""), total > 0 and not bad))
    la, lb = _losses(run_a), _losses(run_b)
    out.append(("loss curve", f"{sum(x == y for x, y in zip(la, lb))} of {len(la)} / {len(lb)} equal",
                len(la) == len(lb) == steps and la == lb))
    return out


def run(ctx: PartContext) -> list[dict[str, Any]]:
    """Uninterrupted and interrupted torchrun trainings side by side; SIGUSR1 to the latter's worker; resume;
    compare."""
    from bench.run.preemption import EXIT_REQUEUE

    plan = ctx.plan
    root = ctx.work_dir / "preempt"
    root.mkdir(parents=True, exist_ok=True)
    overrides = trainer_overrides(plan, ctx.device)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if ctx.device == "cpu":
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    ctx.info["command"] = shlex.join(["torchrun", "--standalone", "--nproc_per_node", "1",
                                      "benchmarks/gpu_acceptance.py", "--deterministic-trainer", *overrides,
                                      "--run.out_dir=<dir>"])
    rows: list[dict[str, Any]] = []

    def check(name: str, expected: Any, observed: Any, ok: bool) -> None:
        rows.append(dict(check=name, expected=str(expected), observed=str(observed), ok=bool(ok)))
        ctx.note(f"{'PASS' if ok else 'FAIL'} {name}: {observed}")
        ctx.save(rows)

    def launch(out_name: str, log_name: str) -> tuple[subprocess.Popen, Path, Any]:
        log = open(root / f"{log_name}.stderr", "w")  # noqa: SIM115 - closed after the process ends
        proc = subprocess.Popen(torchrun_command(overrides, root / out_name), cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        return proc, root / out_name, log

    def finish(proc: subprocess.Popen, log, timeout: float) -> int:
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise TimeoutError(f"a torchrun did not finish within the part's budget (logs in {root})") from None
        finally:
            log.close()

    start = time.perf_counter()
    straight, straight_out, straight_log = launch("straight", "straight")
    split, split_out, split_log = launch("split", "interrupted")
    # On a GPU a second uninterrupted run tells a resume bug from kernel nondeterminism, should the runs differ.
    control = launch("control", "control") if plan["control_run"] else None
    try:
        while _logged_steps(split_out) < plan["signal_after"]:
            if split.poll() is not None:
                tail = (root / "interrupted.stderr").read_text()[-3000:]
                raise RuntimeError(f"the interrupted run exited ({split.returncode}) before it logged "
                                   f"{plan['signal_after']} steps:\n{tail}")
            if ctx.time_left() < 10:
                raise TimeoutError("the interrupted run did not start training within the budget")
            time.sleep(0.05)
        workers = child_pids(split.pid)
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
        signalled_at = _logged_steps(split_out)
        ctx.note(f"SIGUSR1 to worker(s) {workers} after {signalled_at} logged steps "
                 f"({time.perf_counter() - start:.1f} s after launch)")
        split_rc = finish(split, split_log, ctx.time_left() - 5)
        split_s = time.perf_counter() - start
    except BaseException:
        for proc in (straight, split, *(control[:1] if control else ())):
            kill_tree(proc)
        raise
    stderr = (root / "interrupted.stderr").read_text()
    run = _run_dir(split_out)
    marker = json.loads((run / "PREEMPTED").read_text()) if run and (run / "PREEMPTED").is_file() else None
    stopped = marker["step"] if marker else None
    check("workers signalled", "1 torchrun worker", f"{len(workers)} pid(s) {workers}", len(workers) == 1)
    check("torchrun exit code", "1 (torchrun's code for any failed worker)", split_rc, split_rc == 1)
    code = worker_exit_code(stderr)
    check("worker exit code", f"EXIT_REQUEUE = {EXIT_REQUEUE}", code, code == EXIT_REQUEUE)
    check("PREEMPTED marker", "reason SIGUSR1", marker, bool(marker) and marker.get("reason") == "SIGUSR1")
    done = run / "checkpoints" / f"{stopped:07d}" / "DONE" if run and stopped else None
    check("checkpoint at the stop", "checkpoints/<step>/DONE, 0 < step < steps",
          f"step {stopped}" if done and done.is_file() else "missing",
          bool(done and done.is_file()) and 0 < stopped < plan["steps"])
    if not marker:
        for proc in (straight, *(control[:1] if control else ())):
            kill_tree(proc)
        ctx.info["wall"] = {"interrupted": split_s}
        return rows

    resume_start = time.perf_counter()
    resume, _, resume_log = launch("split", "resumed")
    resume_rc = finish(resume, resume_log, ctx.time_left() - 5)
    resume_s = time.perf_counter() - resume_start
    straight_rc = finish(straight, straight_log, ctx.time_left() - 2)
    ctx.info["wall"] = {"interrupted": split_s, "resumed": resume_s}
    check("resumed run exit code", 0, resume_rc, resume_rc == 0)
    check("uninterrupted run exit code", 0, straight_rc, straight_rc == 0)
    if resume_rc != 0 or straight_rc != 0:
        if control is not None:
            kill_tree(control[0])
        ctx.note("stderr tails:\n" + (root / "resumed.stderr").read_text()[-2000:]
                 + (root / "straight.stderr").read_text()[-2000:])
        return rows
    run_a, run_b = _run_dir(straight_out), _run_dir(split_out)
    summary = json.loads((run_b / "summary.json").read_text())
    check("resumed from the checkpoint", f"resumed_from_step = {stopped}, no PREEMPTED left",
          f"resumed_from_step = {summary['resumed_from_step']}, PREEMPTED "
          f"{'present' if (run_b / 'PREEMPTED').exists() else 'removed'}",
          summary["resumed_from_step"] == stopped and not (run_b / "PREEMPTED").exists())
    deterministic = None
    if control is not None:
        control_rc = finish(control[0], control[2], ctx.time_left() - 2)
        same = compare_runs(run_a, _run_dir(control[1]), plan["steps"]) if control_rc == 0 else []
        deterministic = bool(same) and all(ok for _, _, ok in same)
        check("control: two uninterrupted runs bit-identical (kernel determinism)", "export, checkpoint, losses",
              f"exit {control_rc}; " + "; ".join(f"{what}: {observed}" for what, observed, _ in same),
              deterministic)
    for what, observed, ok in compare_runs(run_a, run_b, plan["steps"]):
        if not ok and deterministic is False:
            observed += " (inconclusive: two uninterrupted runs differ too, see the control row)"
        check(f"resumed = uninterrupted: {what} bit-identical", "every value equal", observed, ok)
    ctx.info["stopped_step"] = stopped
    return rows


def render(rows: list[dict], info: dict, plan: dict) -> list[str]:
    wall = ", ".join(f"{k} {v:.1f} s" for k, v in info.get("wall", {}).items() if v is not None)
    lines = [f"Setup: `torchrun --standalone --nproc_per_node 1` on the trainer (`bench.run.train.main` behind this "
             f"file's `--deterministic-trainer`): {plan['arch']} on {plan['image_size']} px synthetic images, global "
             f"batch {plan['global_batch']}, {plan['steps']} steps, DeepSpeed ZeRO-2 {plan['precision']}, "
             "deterministic kernels (`torch.use_deterministic_algorithms(True, warn_only=True)`, "
             "`CUBLAS_WORKSPACE_CONFIG=:4096:8`). An uninterrupted run and the interrupted one start together"
             + (" (with a second uninterrupted run as a control of kernel determinism)" if plan.get("control_run")
                else "") + "; "
             f"SIGUSR1 goes to the interrupted run's worker once it has logged {plan['signal_after']} steps (the "
             "torchrun agent is not signalled: as under `slurm/job.sbatch`, the signal reaches the training "
             "process); the same command then resumes it. Wall: " + (wall or "-") + ".",
             "", f"Trainer command: `{info.get('command', '-')}`", "",
             "| check | expected | observed | result |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['expected']} | {r['observed']} | {'PASS' if r['ok'] else '**FAIL**'} |")
    return lines
