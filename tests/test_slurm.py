"""The SLURM executor: the job graph ``bench.pipeline.slurm.submit`` builds (fast: dry runs and a fake ``sbatch``), and
``sbatch slurm/run_all.sh`` on a real SLURM cluster (``slurm/testing/local_cluster.sh``; .ci/run starts one).

The tests marked ``slurm`` need slurmctld/slurmd running on this machine and take minutes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from suitefixtures import DENSE, FULL_AND_LORA, NOVEL_A, mini_suite, suite_file, suite_toml
from trainrun import REPO

from bench.pipeline import slurm
from bench.pipeline.executor import build_plan
from bench.pipeline.jobs import Roots
from bench.pipeline.status import JobState

# ---- the job graph (fast: dry runs and a fake sbatch, no cluster) -------------------------------------------------

GRAPH_SUITE = mini_suite("graph")  # 1 ancestry, scratch/full/lora x novel-a and sketch (a domain task)


def _graph_plan(tmp_path):
    path = suite_file(tmp_path, GRAPH_SUITE, "graph.toml")
    return build_plan(path, [])[1], Roots(tmp_path / "runs", tmp_path / "results")


def _options(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def _jobs_of(argv: list[str]) -> list[str]:
    export = dict(kv.split("=", 1) for kv in _options(argv)["export"].split(",")[1:])
    return [export["KB_JOB"]] if export.get("KB_JOB") else Path(export["KB_JOB_LIST"]).read_text().split()


def _graph(calls: list[tuple[str, list[str]]]) -> tuple[dict[str, str], dict[str, tuple[str | None, set[str]]]]:
    """(SLURM id, sbatch argv) per submission -> (job id -> its SLURM id, job id -> (dependency type, the SLURM ids
    of the single jobs / array tasks it waits on: a whole array counts as each of its tasks))."""
    slurm_id: dict[str, str] = {}
    tasks: dict[str, set[str]] = {}
    for sid, argv in calls:
        jobs = _jobs_of(argv)
        if "array" in _options(argv):
            tasks[sid] = {f"{sid}_{i}" for i in range(len(jobs))}
            slurm_id.update({job: f"{sid}_{i}" for i, job in enumerate(jobs)})
        else:
            (job,) = jobs
            slurm_id[job] = sid
    waits: dict[str, tuple[str | None, set[str]]] = {}
    for _sid, argv in calls:
        kind, _, ids = _options(argv).get("dependency", "").partition(":")
        after = set().union(*[tasks.get(i, {i}) for i in ids.split(":") if i])
        assert ("--kill-on-invalid-dep=yes" in argv) == bool(after)
        waits.update({job: (kind or None, after) for job in _jobs_of(argv)})
    return slurm_id, waits


def test_each_job_waits_on_exactly_the_jobs_it_depends_on(tmp_path):
    plan, roots = _graph_plan(tmp_path)
    cluster = slurm.Cluster.from_env({"KB_PARTITION": "debug", "KB_GPUS_PER_NODE": "8", "KB_NODES_TRAIN": "2"})
    commands = slurm.submit(plan, roots, cluster, dry_run=True)
    argvs = {name: shlex.split(cmd) for name, cmd in commands.items()}
    slurm_id, waits = _graph([(f"DRYRUN-{name}", argv) for name, argv in argvs.items()])
    assert sorted(slurm_id) == sorted(plan.jobs)  # every job once
    for job in plan.jobs.values():
        kind = ("afterany" if job.step == "aggregate" else "afterok") if job.deps else None
        assert waits[job.job_id] == (kind, {slurm_id[d] for d in job.deps}), job.job_id
    # in words: a sample waits on its own transfer, an evaluation on its sample and its reference, the aggregation on
    # every evaluation (afterany: a failed run leaves a partial leaderboard)
    for sample in plan.by_step("sample"):
        assert waits[sample.job_id] == ("afterok", {slurm_id[sample.deps[0]]})
    for evaluate in plan.by_step("evaluate"):
        assert waits[evaluate.job_id] == ("afterok", {slurm_id[evaluate.info["sample_job"]],
                                                      slurm_id[evaluate.info["prepare_job"]]})
    (aggregate,) = plan.by_step("aggregate")
    assert waits[aggregate.job_id] == ("afterany", {slurm_id[e.job_id] for e in plan.by_step("evaluate")})
    # jobs of a stage with the same dependencies share an array: the references, the transfers from one ancestry
    assert set(commands) == {"prepare", "pretrain", "train-0", "train-1", *(f"sample-{i}" for i in range(6)),
                             *(f"evaluate-{i}" for i in range(6)), "aggregate"}
    assert "--array=0-1" in argvs["prepare"] and "--dependency" not in commands["prepare"]
    from_dense = [t.job_id for t in plan.by_step("train") if t.deps]
    assert _jobs_of(argvs["train-1"]) == from_dense
    assert "--dependency=afterok:DRYRUN-pretrain" in argvs["train-1"]
    sample = plan.by_step("sample")[0]
    assert f"--dependency=afterok:{slurm_id[sample.deps[0]]}" in commands["sample-0"]
    for name in ("pretrain", "train-0", "sample-0"):  # training and sampling: requeued on preemption
        assert "--requeue" in argvs[name] and "--signal=B:USR1@300" in argvs[name]
    assert "--nodes=2" in argvs["train-0"] and "--gpus-per-node=8" in argvs["train-0"]
    assert "--requeue" not in argvs["evaluate-0"]


def test_a_distilled_ancestry_waits_on_its_teacher_only(tmp_path):
    from test_plan import _DistilledProbe, teacher_suite, write_suite

    _DistilledProbe.register()
    plan = build_plan(write_suite(tmp_path, teacher_suite()), [])[1]
    commands = slurm.submit(plan, Roots(tmp_path / "runs", tmp_path / "results"), slurm.Cluster.from_env({}),
                            dry_run=True)
    slurm_id, waits = _graph([(f"DRYRUN-{name}", shlex.split(cmd)) for name, cmd in commands.items()])
    ancestries = {j.info["ancestry"]: j.job_id for j in plan.by_step("pretrain")}
    assert slurm_id[ancestries["dense"]] == "DRYRUN-pretrain"  # the second wave: after its teacher
    assert slurm_id[ancestries["student"]] == "DRYRUN-pretrain.1"
    assert waits[ancestries["student"]] == ("afterok", {"DRYRUN-pretrain"})
    for job in plan.jobs.values():
        assert waits[job.job_id][1] == {slurm_id[d] for d in job.deps}, job.job_id


class FakeCluster:
    """A fake ``sbatch`` (logs its arguments, prints increasing job ids), a fake queue and fake job states."""

    def __init__(self, tmp_path, monkeypatch):
        self.log = tmp_path / "sbatch.log"
        self.sbatch = tmp_path / "sbatch"
        self.sbatch.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""
            import json, sys
            from pathlib import Path
            log = Path({str(self.log)!r})
            n = len(log.read_text().splitlines()) if log.exists() else 0
            with log.open("a") as f:
                f.write(json.dumps(sys.argv[1:]) + "\\n")
            print(f"{{1000 + n}};local")
        """))
        self.sbatch.chmod(0o755)
        self.queue: set[str] = set()
        self.states: dict[str, JobState] = {}
        self.kwargs: dict = {}
        monkeypatch.setattr(slurm, "queued_ids", lambda ids: set(ids) & self.queue)
        monkeypatch.setattr(slurm, "plan_states", self._plan_states)

    def _plan_states(self, plan, roots, **kwargs):
        self.kwargs = kwargs
        return {j: self.states.get(j, JobState("pending", "no record")) for j in plan.jobs}

    def calls(self) -> list[tuple[str, list[str]]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [(str(1000 + i), json.loads(line)) for i, line in enumerate(lines)]

    def submit(self, plan, roots) -> list[tuple[str, list[str]]]:
        """Submit; return this submission's sbatch calls."""
        before = len(self.calls())
        slurm.submit(plan, roots, slurm.Cluster.from_env({}), sbatch=str(self.sbatch))
        return self.calls()[before:]


def test_resubmitting_after_a_failed_transfer_submits_it_its_dependants_and_the_aggregation(tmp_path, monkeypatch):
    plan, roots = _graph_plan(tmp_path)
    fake = FakeCluster(tmp_path, monkeypatch)
    first = fake.submit(plan, roots)
    assert len(first) == 17 and sorted(_graph(first)[0]) == sorted(plan.jobs)
    ledger = json.loads((roots.runs / "slurm" / "ledger.json").read_text())
    assert set(ledger) == set(plan.jobs)

    # the first wave ended: one transfer failed, SLURM cancelled its sample and evaluation, everything else ran,
    # and the aggregation read the evaluations that finished (so its record is trusted as it stands)
    lora = next(t for t in plan.by_step("train") if t.info["method"] == "lora" and t.info["task"] == "novel-a")
    (sample,) = [s for s in plan.by_step("sample") if s.deps == (lora.job_id,)]
    (evaluate,) = [e for e in plan.by_step("evaluate") if e.info["sample_job"] == sample.job_id]
    (aggregate,) = plan.by_step("aggregate")
    fake.states = {j: JobState("done") for j in plan.jobs}
    fake.states.update({lora.job_id: JobState("failed", "out of memory"),
                        sample.job_id: JobState("upstream", "input is failed"),
                        evaluate.job_id: JobState("upstream", "input is pending")})
    second = fake.submit(plan, roots)
    slurm_id, waits = _graph(second)
    assert set(slurm_id) == {lora.job_id, sample.job_id, evaluate.job_id, aggregate.job_id}
    assert waits[lora.job_id] == (None, set())  # its ancestry is done
    assert waits[sample.job_id] == ("afterok", {slurm_id[lora.job_id]})
    assert waits[evaluate.job_id] == ("afterok", {slurm_id[sample.job_id]})  # its reference is done
    assert waits[aggregate.job_id] == ("afterany", {slurm_id[evaluate.job_id]})
    assert json.loads((roots.runs / "slurm" / "ledger.json").read_text()) == {**ledger, **slurm_id}

    # all done: nothing to submit, the aggregation included
    fake.states = {j: JobState("done") for j in plan.jobs}
    assert fake.submit(plan, roots) == []
    # an evaluation re-run elsewhere changed what the aggregation read: it alone is submitted
    fake.states[aggregate.job_id] = JobState("changed", f"input {evaluate.job_id} is not the one it consumed")
    (only,) = fake.submit(plan, roots)
    assert _graph([only])[1] == {aggregate.job_id: (None, set())}


def test_jobs_still_queued_are_depended_on_not_resubmitted(tmp_path, monkeypatch):
    plan, roots = _graph_plan(tmp_path)
    fake = FakeCluster(tmp_path, monkeypatch)
    first_ids, _ = _graph(fake.submit(plan, roots))
    # the transfers and the references are still running; the rest was cancelled by hand (scancel)
    fake.queue = {first_ids[j.job_id] for j in plan.jobs.values() if j.step in ("prepare", "train")}
    fake.states = {j.job_id: JobState("done") for j in plan.by_step("pretrain")}
    slurm_id, waits = _graph(fake.submit(plan, roots))
    assert {plan.jobs[j].step for j in slurm_id} == {"sample", "evaluate", "aggregate"}
    for sample in plan.by_step("sample"):
        assert waits[sample.job_id] == ("afterok", {first_ids[sample.deps[0]]})
    for evaluate in plan.by_step("evaluate"):
        assert waits[evaluate.job_id] == ("afterok", {slurm_id[evaluate.info["sample_job"]],
                                                      first_ids[evaluate.info["prepare_job"]]})


def test_submit_cli_passes_keep_stale_and_prints_the_dry_run(tmp_path, monkeypatch, capsys):
    fake = FakeCluster(tmp_path, monkeypatch)
    args = ["submit", "--suite", suite_file(tmp_path, GRAPH_SUITE, "graph.toml"), "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--dry-run"]
    assert slurm.main([*args, "--keep-stale"]) == 0
    assert fake.kwargs == {"keep_stale": True, "force": False}
    out = capsys.readouterr().out
    assert re.search(r"^sample-0 +\S*sbatch --parsable .*--dependency=afterok:DRYRUN-train-\d+_\d+ ", out,
                     re.MULTILINE)
    assert "aggregate: 1 to run" in out
    assert slurm.main(args) == 0 and fake.kwargs == {"keep_stale": False, "force": False}
    assert not fake.calls()


# ---- on a real SLURM cluster ------------------------------------------------------------------------------------

def _cluster_suite(name: str, *, steps: int = 3, num_steps: int = 3, engine: dict | None = None) -> str:
    """full and lora from a dense ancestry on novel-a, logging every step, 16 samples in one batch of ``num_steps``
    DDIM steps, a 4-images-a-class reference."""
    return suite_toml(name, engine=engine, schedule={"steps": steps, "log_every": 1},
                      sample={"num_samples": 16, "per_proc_batch": 16, "scheduler": "ddim", "num_steps": num_steps},
                      evaluate={"ref_per_class": 4}, ancestries=[DENSE], tasks=[NOVEL_A], methods=FULL_AND_LORA)


SUITE = _cluster_suite("slurm-mini")


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(state in out.stdout for state in ("idle", "mix", "alloc"))


needs_cluster = pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster here: start one with "
                                   "`bash slurm/testing/local_cluster.sh` (.ci/run does)")


def _env() -> dict[str, str]:
    return {**os.environ, "KB_CLUSTER": "local", "KB_PYTHON": os.environ.get("KB_PYTHON", _python())}


def _python() -> str:
    return sys.executable


def _run_all(tmp: Path, *args: str) -> str:
    """``sbatch --wait slurm/run_all.sh`` (the submitter job itself), returning its output file's text."""
    out = tmp / f"submit-{time.time_ns()}.out"
    proc = subprocess.run(["sbatch", "--wait", f"--output={out}", "slurm/run_all.sh", "--runs", str(tmp / "runs"),
                           "--results", str(tmp / "results"), *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stderr + text
    return text


def _wait_for_queue_to_drain(prefix: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
        if not any(name.startswith(prefix) for name in out):
            return
        time.sleep(2)
    subprocess.run(["scancel", "--name", prefix + "*"], capture_output=True)
    pytest.fail(f"SLURM jobs {prefix}* still queued after {timeout} s")


def _ledger(tmp: Path) -> dict[str, str]:
    return json.loads((tmp / "runs/slurm/ledger.json").read_text())


def _logs(tmp: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted((tmp / "runs/slurm/logs").glob("*")))


@pytest.mark.slurm
@needs_cluster
def test_run_all_submits_a_job_graph_that_finishes_and_resubmitting_submits_nothing(tmp_path):
    suite = suite_file(tmp_path, SUITE, "slurm-mini.toml")
    text = _run_all(tmp_path, "--suite", str(suite))
    for stage in ("prepare", "pretrain", "train", "sample", "evaluate", "aggregate"):
        assert re.search(rf"^{stage}\s+\d+", text, flags=re.M), text
    _wait_for_queue_to_drain("kb-slurm-mini", timeout=1500)

    plan = build_plan(str(suite), [])[1]
    records = list((tmp_path / "results/records").glob("*.json"))
    assert sorted(p.stem for p in records) == sorted(plan.jobs), _logs(tmp_path)
    assert not list((tmp_path / "results").glob("failed/*.json")), _logs(tmp_path)
    csvs = list((tmp_path / "results/leaderboard").glob("*.csv"))
    assert csvs, _logs(tmp_path)
    assert list((tmp_path / "results/plots").rglob("*.png")), _logs(tmp_path)

    again = _run_all(tmp_path, "--suite", str(suite))
    assert "nothing to submit" in again


@pytest.mark.slurm
@needs_cluster
def test_a_signalled_training_job_is_requeued_and_resumes(tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@N does before the time limit): the trainer checkpoints, the job
    is requeued, and the next attempt resumes from that checkpoint and finishes."""
    text = SUITE.replace('overrides = { data = { split = "pretrain" } }',
                        'overrides = { data = { split = "pretrain" }, '
                        'schedule = { steps = 2000, ckpt_every = 100000 } }')
    suite = suite_file(tmp_path, text, "slurm-mini.toml")
    _run_all(tmp_path, "--suite", str(suite))
    (ancestry,) = build_plan(str(suite), [])[1].by_step("pretrain")
    ancestry_id = _ledger(tmp_path)[ancestry.job_id]  # a single job: one ancestry
    run_dirs = lambda: [p for p in (tmp_path / "runs").glob("scratch--ancestry-dense--*") if p.is_dir()]  # noqa: E731
    deadline = time.time() + 600
    while time.time() < deadline and not any((d / "train.jsonl").exists() for d in run_dirs()):
        time.sleep(1)
    assert run_dirs(), _logs(tmp_path)
    # The first logged step means the trainer's handlers are installed; signal at once. At 400 steps (this test's
    # first setting) a quiet machine had finished training 3 s after that step, and scancel found no job to signal.
    time.sleep(0.5)
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", ancestry_id], capture_output=True, text=True)
    queue = subprocess.run(["squeue", "-h", "-j", ancestry_id, "-o", "%i %T %r"], capture_output=True, text=True)
    assert signalled.returncode == 0, (f"scancel: {signalled.stderr.strip()}; squeue: {queue.stdout.strip()}"
                                       f"{queue.stderr.strip()}\n{_logs(tmp_path)}")
    _wait_for_queue_to_drain("kb-slurm-mini", timeout=1800)

    (run_dir,) = run_dirs()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] > 0, _logs(tmp_path)
    assert summary["steps"] == 2000 and not (run_dir / "PREEMPTED").exists()
    log = (tmp_path / "runs/slurm/logs").glob(f"pretrain-{ancestry_id}.out")
    text = "".join(p.read_text() for p in log)
    assert "requeueing" in text and "restart 1" in text, text[-3000:]



FAIL_SUITE = _cluster_suite("slurm-fail", steps=4, num_steps=2, engine={"cpu_threads": 1})


def _ranked_methods(results: Path) -> set[str]:
    import csv

    rows = [row for path in results.glob("leaderboard/*/leaderboard.csv") for row in csv.DictReader(path.open())]
    return {row["method"] for row in rows if row.get("rank")}


@pytest.mark.slurm
@needs_cluster
def test_a_failed_transfer_cancels_only_its_dependants_and_resubmitting_completes_the_leaderboard(tmp_path, capsys):
    """One transfer fails (it finds a checkpoint of another config where it would resume, as a crashed attempt of
    an edited run leaves one): SLURM cancels its sample and evaluation only, the other transfer of the same array is
    sampled and scored. Once the checkpoint is removed, submitting again runs that transfer, its sample and
    evaluation, and re-aggregates; then there is nothing left to submit."""
    from bench.pipeline.plan import dependents
    from bench.records.store import RecordStore

    suite = suite_file(tmp_path, FAIL_SUITE, "slurm-fail.toml")
    plan = build_plan(str(suite), [])[1]
    (aggregate,) = plan.by_step("aggregate")
    (lora,) = [j for j in plan.by_step("train") if j.info["method"] == "lora"]
    cancelled = dependents(plan, lora.job_id) - {aggregate.job_id}
    assert {plan.jobs[j].step for j in cancelled} == {"sample", "evaluate"}
    foreign = tmp_path / "runs" / lora.run_id / "checkpoints" / "0000002"
    foreign.mkdir(parents=True)
    (foreign / "state.json").write_text(json.dumps({"step": 2, "config_hash": "0123456789abcdef"}))
    (foreign / "DONE").write_text("2")

    _run_all(tmp_path, "--suite", str(suite))
    _wait_for_queue_to_drain("kb-slurm-fail", timeout=240)
    store = RecordStore(tmp_path / "results")
    failure = store.failed(lora.job_id)
    assert failure is not None and "different config" in failure["error"], _logs(tmp_path)
    for job_id in plan.jobs:
        if job_id in cancelled:  # SLURM cancelled them (their dependency failed): they never started
            assert store.read(job_id) is None and store.failed(job_id) is None, job_id
            assert not list((tmp_path / "runs/slurm/logs").glob(f"*-{_ledger(tmp_path)[job_id]}.out")), job_id
        elif job_id != lora.job_id:
            assert store.read(job_id) is not None, f"{job_id} did not run\n{_logs(tmp_path)}"
    assert _ranked_methods(tmp_path / "results") == {"full"}

    shutil.rmtree(foreign)  # the cause fixed
    before = _ledger(tmp_path)
    text = _run_all(tmp_path, "--suite", str(suite))
    after = _ledger(tmp_path)
    assert {j for j in after if after[j] != before.get(j)} == {lora.job_id, aggregate.job_id} | cancelled, text
    _wait_for_queue_to_drain("kb-slurm-fail", timeout=200)
    assert all(store.read(j) is not None for j in plan.jobs), _logs(tmp_path)
    assert _ranked_methods(tmp_path / "results") == {"full", "lora"}, _logs(tmp_path)
    # what run_all.sh runs, in this process (faster than a submitter job): the re-aggregation counts as done now
    assert slurm.main(["submit", "--suite", str(suite), "--runs", str(tmp_path / "runs"),
                       "--results", str(tmp_path / "results")]) == 0
    assert "nothing to submit" in capsys.readouterr().out


def test_the_batch_script_and_the_repository_are_found_from_the_package():
    from bench.records import environment

    assert (slurm.REPO / "slurm" / "job.sbatch").is_file() and (slurm.REPO / "pyproject.toml").is_file()
    assert (environment._REPO / "pyproject.toml").is_file()
