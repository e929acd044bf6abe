"""Suites and plans: content-addressed ids, dependency-exact invalidation, validation before anything runs,
and the SLURM job graph (dry run: the commands that would be submitted)."""

from __future__ import annotations

import re
import textwrap

import pytest

from bench.executor import build_plan
from bench.jobs import Roots
from bench.plan import STAGES, dependents, make_plan
from bench.slurm import Cluster, submit
from bench.suite import SuiteError, load_suite

SUITE = textwrap.dedent("""
    name = "mini"
    seeds = [0]
    archs = ["DiT-T/2"]
    [defaults.model]
    in_channels = 3
    input_size = 16
    [defaults.data]
    image_size = 16
    per_class = 4
    [defaults.schedule]
    global_batch = 8
    steps = 3
    [protocol.sample]
    num_samples = 8
    [protocol.eval]
    extractor = "synthetic"
    [ancestries.dense]
    method = "scratch"
    overrides = { data = { split = "pretrain" }, schedule = { steps = 5 } }
    [tasks.novel-a]
    overrides = { data = { split = "novel-a" } }
    [tasks.sketch]
    stage = "domain"
    overrides = { data = { split = "novel-a", domain = "sketch" } }
    [[methods]]
    name = "scratch"
    [[methods]]
    name = "full"
    ancestry = "dense"
    [[methods]]
    name = "lora"
    ancestry = "dense"
    options = { rank = 2 }
""")


def write_suite(tmp_path, text=SUITE, name="mini.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_plan_has_every_stage_in_dependency_order(tmp_path):
    plan = make_plan(load_suite(write_suite(tmp_path)))
    assert {j.stage for j in plan.jobs.values()} == set(STAGES)
    seen = set()
    for job in plan.jobs.values():
        assert set(job.deps) <= seen, f"{job.job_id} comes before its dependencies"
        seen.add(job.job_id)
    # 1 ancestry, 3 methods x 2 tasks of transfer/sample/evaluate, 2 prepare, 1 aggregate
    counts = {s: len(plan.by_stage(s)) for s in STAGES}
    assert counts == {"prepare": 2, "ancestry": 1, "transfer": 6, "sample": 6, "evaluate": 6, "aggregate": 1}
    assert make_plan(load_suite(write_suite(tmp_path))).jobs.keys() == plan.jobs.keys()  # reproducible ids


def test_changing_one_setting_changes_exactly_the_dependent_ids(tmp_path):
    base = make_plan(load_suite(write_suite(tmp_path)))
    changed = make_plan(load_suite(write_suite(tmp_path, SUITE.replace("steps = 5", "steps = 6"), "b.toml")))
    (ancestry,) = base.by_stage("ancestry")
    expected_changed = {ancestry.job_id} | dependents(base, ancestry.job_id)
    unchanged = set(base.jobs) - expected_changed
    assert unchanged <= set(changed.jobs), "jobs that do not depend on the ancestry must keep their ids"
    assert not (expected_changed & set(changed.jobs)), "every job downstream of the ancestry must get a new id"
    assert any(j.startswith("scratch--") for j in unchanged)  # the from-scratch runs are untouched


def test_sampling_protocol_changes_sample_and_evaluate_ids_only(tmp_path):
    base = make_plan(load_suite(write_suite(tmp_path)))
    changed = make_plan(load_suite(write_suite(tmp_path, SUITE.replace("num_samples = 8", "num_samples = 16"),
                                               "c.toml")))
    kept = set(base.jobs) & set(changed.jobs)
    assert {base.jobs[j].stage for j in set(base.jobs) - kept} == {"sample", "evaluate", "aggregate"}
    assert {j.stage for j in base.jobs.values() if j.job_id in kept} == {"prepare", "ancestry", "transfer"}


@pytest.mark.parametrize("edit, message", [
    (('name = "full"', 'name = "fulll"'), "unknown method 'fulll'"),
    (('ancestry = "dense"\n[[methods]]\nname = "lora"', 'ancestry = "dense"\ntasks = ["novel-b"]\n[[methods]]\nname = "lora"'),
     "unknown task 'novel-b'"),
    (('ancestry = "dense"\n[[methods]]\nname = "lora"', 'ancestry = "sparse"\n[[methods]]\nname = "lora"'),
     "unknown ancestry 'sparse'"),
    (('stage = "domain"', 'stage = "sideways"'), "stage must be one of"),
    (("per_class = 4", "per_klass = 4"), "unknown config key 'data.per_klass'"),
])
def test_bad_suite_is_a_clear_error_before_anything_runs(tmp_path, edit, message):
    text = SUITE.replace(*edit)
    assert text != SUITE, "the edit must apply"
    with pytest.raises(SuiteError, match=re.escape(message)):
        build_plan(write_suite(tmp_path, text, "bad.toml"), [])


def test_method_without_the_stage_is_rejected(tmp_path):
    text = SUITE + '[[methods]]\nname = "lora"\nvariant = "b"\nancestry = "dense"\n'
    text = text.replace('[tasks.novel-a]', '[tasks.deeper]\nstage = "descend"\n[tasks.novel-a]')
    with pytest.raises(SuiteError, match="does not support the 'descend' stage"):
        build_plan(write_suite(tmp_path, text, "stage.toml"), [])


def test_missing_data_and_weights_paths_are_reported_before_running(tmp_path, monkeypatch):
    monkeypatch.delenv("KINDBENCH_WEIGHTS_DIR", raising=False)
    text = SUITE.replace('extractor = "synthetic"', 'extractor = "inception"\nreference = "/nowhere/ref.npz"')
    with pytest.raises(SuiteError) as err:
        build_plan(write_suite(tmp_path, text, "paths.toml"),
                   ["data.source=imagefolder", f"data.root={tmp_path / 'imagenet'}", "data.class_list=example"])
    message = str(err.value)
    assert str(tmp_path / "imagenet") in message and "/nowhere/ref.npz" in message and "KINDBENCH_WEIGHTS_DIR" in message


def test_shipped_suites_load():
    plan = build_plan("tiny", [])[1]
    assert plan.by_stage("aggregate")


def test_slurm_dry_run_job_graph(tmp_path):
    suite, plan = build_plan(write_suite(tmp_path), [])
    roots = Roots(tmp_path / "runs", tmp_path / "results")
    cluster = Cluster.from_env({"KB_PARTITION": "debug", "KB_GPUS_PER_NODE": "8", "KB_NODES_TRAIN": "2",
                                "KB_SIGNAL_LEAD": "300"})
    commands = submit(plan, roots, cluster, dry_run=True)
    assert list(commands) == list(STAGES)
    for stage, cmd in commands.items():
        n = len(plan.by_stage(stage))
        assert f"--array=0-{n - 1}" in cmd and "--partition=debug" in cmd
        job_list = (roots.runs / "slurm" / plan.plan_id() / f"{stage}.txt").read_text().split()
        assert job_list == [j.job_id for j in plan.by_stage(stage)]
    assert "--dependency" not in commands["prepare"] and "--dependency" not in commands["ancestry"]
    assert "--dependency=afterok:DRYRUN-ancestry" in commands["transfer"]
    assert "--dependency=afterok:DRYRUN-transfer" in commands["sample"]
    assert "afterok:DRYRUN-prepare:DRYRUN-sample" in commands["evaluate"]
    assert "--dependency=afterany:DRYRUN-evaluate" in commands["aggregate"]
    for stage in ("ancestry", "transfer"):
        cmd = commands[stage]
        assert "--requeue" in cmd and "--signal=B:USR1@300" in cmd and "--nodes=2" in cmd
        assert "--gpus-per-node=8" in cmd
    assert "--requeue" not in commands["evaluate"]
