"""Suites and plans: content-addressed ids, dependency-exact invalidation, validation before anything runs.
(The SLURM job graph built from a plan is tested in ``test_slurm.py``.)"""

from __future__ import annotations

import re
import textwrap

import pytest
from suitefixtures import mini_suite, suite_file

from bench.config.suite import SuiteError, load_suite
from bench.pipeline.executor import build_plan
from bench.pipeline.plan import STEPS, dependents, make_plan

# the dense ancestry trains 5 steps, the transfers 3: tests change one setting and see which ids change
SUITE = mini_suite("mini", schedule={"steps": 5})


def write_suite(tmp_path, text=SUITE, name="mini.toml"):
    return suite_file(tmp_path, text, name)


def test_plan_has_every_stage_in_dependency_order(tmp_path):
    plan = make_plan(load_suite(write_suite(tmp_path)))
    assert {j.step for j in plan.jobs.values()} == set(STEPS)
    seen = set()
    for job in plan.jobs.values():
        assert set(job.deps) <= seen, f"{job.job_id} comes before its dependencies"
        seen.add(job.job_id)
    # 1 ancestry, 3 methods x 2 tasks of transfer/sample/evaluate, 2 prepare, 1 aggregate
    counts = {s: len(plan.by_step(s)) for s in STEPS}
    assert counts == {"prepare": 2, "pretrain": 1, "train": 6, "sample": 6, "evaluate": 6, "aggregate": 1}
    assert make_plan(load_suite(write_suite(tmp_path))).jobs.keys() == plan.jobs.keys()  # reproducible ids


def test_changing_one_setting_changes_exactly_the_dependent_ids(tmp_path):
    base = make_plan(load_suite(write_suite(tmp_path)))
    changed = make_plan(load_suite(write_suite(tmp_path, SUITE.replace("steps = 5", "steps = 6"), "b.toml")))
    (ancestry,) = base.by_step("pretrain")
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
    assert {base.jobs[j].step for j in set(base.jobs) - kept} == {"sample", "evaluate", "aggregate"}
    assert {j.step for j in base.jobs.values() if j.job_id in kept} == {"prepare", "pretrain", "train"}


@pytest.mark.parametrize("edit, message", [
    (('name = "full"', 'name = "fulll"'), "unknown method 'fulll'"),
    (('ancestry = "dense"\n[[methods]]\nname = "lora"',
      'ancestry = "dense"\ntasks = ["novel-b"]\n[[methods]]\nname = "lora"'),
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
    assert (str(tmp_path / "imagenet") in message and "/nowhere/ref.npz" in message
            and "KINDBENCH_WEIGHTS_DIR" in message)


def test_shipped_suites_load():
    plan = build_plan("tiny", [])[1]
    assert plan.by_step("aggregate")


def placed_imagenet(tmp_path, monkeypatch):
    """Empty stand-ins for what the ImageNet suites expect on a cluster (the preflight checks paths only)."""
    for folder in ("lat/novel461", "lat/pretrain150", "lat/imagenet1k", "weights", "vae", "refs"):
        (tmp_path / folder).mkdir(parents=True)
    for ref in ("imagenet-novel461-256.npz", "VIRTUAL_imagenet256_labeled.npz"):
        (tmp_path / "refs" / ref).touch()
    for var, folder in (("KINDBENCH_LATENTS", "lat"), ("KINDBENCH_REFS", "refs"), ("KINDBENCH_WEIGHTS_DIR", "weights"),
                        ("KINDBENCH_VAE_DIR", "vae"), ("KINDBENCH_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / folder))


def test_tiny_runs_every_registered_method():
    from methods import list_methods
    from methods.registry import plugin_methods

    plan = build_plan("tiny", [])[1]
    assert {j.info["method"] for j in plan.by_step("evaluate")} == set(list_methods()) - set(plugin_methods())


@pytest.mark.parametrize("suite", ["kind-dit-b", "kind-dit-l", "fine-depth"])
def test_cluster_suites_plan_once_data_is_placed(tmp_path, monkeypatch, suite):
    placed_imagenet(tmp_path, monkeypatch)
    plan = build_plan(suite, [])[1]
    assert plan.by_step("aggregate") and plan.by_step("evaluate")


def test_fine_depth_suite_covers_the_papers_tables(tmp_path, monkeypatch):
    placed_imagenet(tmp_path, monkeypatch)
    plan = build_plan("fine-depth", [])[1]
    runs = {(j.info["method"], j.info["arch"]) for j in plan.by_step("evaluate")}
    for size in ("B", "L"):
        for depth in (4, 6, 8, 10, 12):
            arch = f"DiT-{size}/2-d{depth}"
            assert {("scratch", arch), ("tleg", arch), ("fine", arch)} <= runs  # Table 1
        assert ("fine_nofactor", f"DiT-{size}/2-d6") in runs  # Table 4
    rules = {j.config["method"]["options"].get("sigma_init") for j in plan.by_step("train")
             if j.info["method"] == "fine" and "sigma" in j.info["variant"]}
    assert rules == {"random", "identical", "interpolate"}  # Table 5
    sigma_phase = [j for j in plan.by_step("pretrain") if j.config["method"]["options"].get("train") == "sigma"]
    assert len(sigma_phase) == 10 and all(j.config["data"]["subset_fraction"] == 0.01 for j in sigma_phase)


@pytest.mark.slow
def test_kind_peft_suite_matches_every_ranked_peft_to_kind(tmp_path, monkeypatch):
    """Budget matching at DiT-B/2 and DiT-L/2 builds every ranked PEFT repeatedly (minutes on a CPU)."""
    placed_imagenet(tmp_path, monkeypatch)
    plan = build_plan("kind-peft", [])[1]
    budget = [j for j in plan.by_step("train") if j.info["variant"] == "kind-budget"]
    assert {j.info["arch"] for j in budget} == {"DiT-B/2", "DiT-L/2"}
    assert {j.info["method"] for j in budget} == {"lora", "dora", "pissa", "vera", "oft", "boft", "loha", "lokr"}
    standard = {(j.info["method"], j.info["arch"]): j for j in plan.by_step("train") if j.info["variant"] == "default"}
    for job in budget:  # a matched rank is a different rank from the standard one, so a different run
        assert job.run_id != standard[(job.info["method"], job.info["arch"])].run_id


# ---- distilled ancestries (a teacher ancestry) and KIND-matched budgets ------------------------------------------

class _DistilledProbe:
    """Registered once: an ancestry method that learns from a dense teacher (as TLEG, SWS and WAVE do)."""

    @staticmethod
    def register() -> None:
        from baselines.scratch import ScratchMethod
        from methods import list_methods, register_method

        if "teacher_probe" in list_methods():
            return

        class TeacherProbe(ScratchMethod):  # only planned here, never built
            name = "teacher_probe"
            teacher_methods = ("scratch",)
            ancestry_methods = ("teacher_probe",)

        register_method("teacher_probe", TeacherProbe)


TEACHER = '''
    [ancestries.student]
    method = "teacher_probe"
    teacher = "dense"
    [[methods]]
    name = "teacher_probe"
    ancestry = "student"
    tasks = ["novel-a"]
'''


def teacher_suite() -> str:
    return SUITE + textwrap.dedent(TEACHER)


def test_a_distilled_ancestry_runs_after_its_teacher_and_inherits_its_ids(tmp_path):
    _DistilledProbe.register()
    plan = build_plan(write_suite(tmp_path, teacher_suite()), [])[1]
    ancestries = {j.info["ancestry"]: j for j in plan.by_step("pretrain")}
    dense, student = ancestries["dense"], ancestries["student"]
    assert student.deps == (dense.job_id,)
    assert student.config["run"]["ancestry"] == f"{dense.run_id}/export.safetensors"
    order = list(plan.jobs)
    assert order.index(dense.job_id) < order.index(student.job_id)
    # the teacher's training changes the student's id and everything downstream of it
    longer = build_plan(write_suite(tmp_path, teacher_suite().replace("steps = 5", "steps = 6"), "b.toml"), [])[1]
    changed = set(plan.jobs) - set(longer.jobs)
    assert student.job_id in changed and dependents(plan, student.job_id) <= changed


@pytest.mark.parametrize("edit, message", [
    (('teacher = "dense"', 'teacher = "nobody"'), "unknown teacher 'nobody'"),
    (('method = "teacher_probe"\nteacher = "dense"', 'method = "scratch"\nteacher = "dense"'),
     "cannot learn from a 'scratch' teacher"),
])
def test_bad_teachers_are_suite_errors(tmp_path, edit, message):
    _DistilledProbe.register()
    text = teacher_suite().replace(*edit)
    assert text != teacher_suite()
    with pytest.raises(SuiteError, match=re.escape(message)):
        build_plan(write_suite(tmp_path, text, "bad.toml"), [])


def test_teacher_cycles_are_suite_errors(tmp_path):
    _DistilledProbe.register()
    text = teacher_suite() + '[ancestries.other]\nmethod = "teacher_probe"\nteacher = "student"\n'
    text = text.replace('teacher = "dense"', 'teacher = "other"')
    with pytest.raises(SuiteError, match="cycle"):
        build_plan(write_suite(tmp_path, text, "cycle.toml"), [])


def test_budget_kind_sets_the_matched_rank_and_caches_it(tmp_path, monkeypatch):
    import bench.pipeline.plan as plan_module
    from bench.models.dit import DiT  # noqa: F401 - imported before timing-free checks below
    from methods.base import ArchSpec
    from methods.budget import kind_matched_rank

    monkeypatch.setenv("KINDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    text = SUITE + textwrap.dedent('''
        [ancestries.kind]
        method = "kind"
        [[methods]]
        name = "kind"
        ancestry = "kind"
        [[methods]]
        name = "lora"
        variant = "kind-budget"
        ancestry = "dense"
        budget = "kind"
        tasks = ["novel-a"]
    ''')
    plan = build_plan(write_suite(tmp_path, text, "budget.toml"), [])[1]
    (job,) = [j for j in plan.by_step("train") if j.info["variant"] == "kind-budget"]
    expected = kind_matched_rank("lora", ArchSpec("DiT-T/2", 16, 3), 8, {}, {}, strict=False)
    assert job.config["method"]["options"] == {"rank": expected}
    assert job.info["benchmark"] == "novel-a--DiT-T-2"

    def refuse(*args, **kwargs):
        raise AssertionError("the matched rank should come from the cache")

    monkeypatch.setattr("methods.budget.kind_matched_rank", refuse)
    again = build_plan(write_suite(tmp_path, text, "budget.toml"), [])[1]
    assert set(again.jobs) == set(plan.jobs)
    assert plan_module  # the cache lives in $KINDBENCH_CACHE_DIR
    assert (tmp_path / "cache" / "budget_ranks.json").is_file()


def test_budget_needs_a_rank_option(tmp_path):
    text = SUITE.replace('name = "full"\nancestry = "dense"', 'name = "full"\nancestry = "dense"\nbudget = "kind"')
    assert text != SUITE
    with pytest.raises(SuiteError, match="cannot match the kind budget"):
        build_plan(write_suite(tmp_path, text, "nobudget.toml"), [])
