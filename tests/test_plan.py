"""Suites and plans: content-addressed ids, dependency-exact invalidation, validation before anything runs.
(The SLURM job graph built from a plan is tested in ``test_slurm.py``.)"""

from __future__ import annotations

import re
import textwrap

import pytest
from suitefixtures import mini_suite, suite_file

from bench.config.suite import SuiteError, load_suite
from bench.pipeline.executor import build_plan
from bench.pipeline.plan import STEPS, dependents, kind_budget_options, make_plan, matched_budget_options

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
    # the sample count is also the floor's (held-out real images scored at the same count by the prepare job)
    assert {base.jobs[j].step for j in set(base.jobs) - kept} == {"prepare", "sample", "evaluate", "aggregate"}
    assert {j.step for j in base.jobs.values() if j.job_id in kept} == {"pretrain", "train"}
    guided_text = SUITE.replace("num_samples = 8", "num_samples = 8\ncfg_scale = 2.0")
    guided = make_plan(load_suite(write_suite(tmp_path, guided_text, "g.toml")))
    kept = set(base.jobs) & set(guided.jobs)
    assert {base.jobs[j].step for j in set(base.jobs) - kept} == {"sample", "evaluate", "aggregate"}


INCEPTION = SUITE.replace('extractor = "synthetic"', 'extractor = "inception"\nreference = "/refs/shared.npz"')


def test_a_task_reference_changes_only_that_tasks_prepare_and_evaluate_ids(tmp_path):
    assert INCEPTION != SUITE
    base = make_plan(load_suite(write_suite(tmp_path, INCEPTION, "shared.toml")))
    own = INCEPTION.replace('[tasks.sketch]\n', '[tasks.sketch]\neval = { reference = "/refs/sketch.npz" }\n')
    assert own != INCEPTION
    changed = make_plan(load_suite(write_suite(tmp_path, own, "own.toml")))
    gone = set(base.jobs) - set(changed.jobs)
    assert {base.jobs[j].step for j in gone} == {"prepare", "evaluate", "aggregate"}
    assert {base.jobs[j].info.get("task") for j in gone if base.jobs[j].step != "aggregate"} == {"sketch"}
    assert len([j for j in gone if base.jobs[j].step == "evaluate"]) == 3  # scratch, full and lora on sketch
    references = {j.info["task"]: j.info["eval"]["reference"] for j in changed.by_step("prepare")}
    assert references == {"novel-a": "/refs/shared.npz", "sketch": "/refs/sketch.npz"}
    assert {j.info["eval"]["reference"] for j in changed.by_step("evaluate") if j.info["task"] == "sketch"} == {
        "/refs/sketch.npz"}
    # a task that sets the suite's own value keeps every id
    same = INCEPTION.replace('[tasks.sketch]\n', '[tasks.sketch]\neval = { reference = "/refs/shared.npz" }\n')
    assert set(make_plan(load_suite(write_suite(tmp_path, same, "same.toml"))).jobs) == set(base.jobs)


def test_task_protocol_keys_are_merged_with_set_and_checked_by_the_preflight(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    (tmp_path / "shared.npz").touch()
    monkeypatch.setenv("KINDBENCH_WEIGHTS_DIR", str(tmp_path / "weights"))
    text = INCEPTION.replace("/refs/shared.npz", str(tmp_path / "shared.npz")).replace(
        '[tasks.sketch]\n', f'[tasks.sketch]\neval = {{ reference = "{tmp_path / "sketch.npz"}" }}\n')
    with pytest.raises(SuiteError) as err:  # only the task's own reference is missing, and the task is named
        build_plan(write_suite(tmp_path, text, "refs.toml"), [])
    assert f"of task 'sketch'): {tmp_path / 'sketch.npz'} does not exist" in str(err.value)
    assert "shared.npz" not in str(err.value)
    (tmp_path / "sketch.npz").touch()
    plan = build_plan(write_suite(tmp_path, text, "refs.toml"), ["eval.ref_per_class=32"])[1]
    protocols = {j.info["task"]: j.info["eval"] for j in plan.by_step("evaluate")}
    assert protocols["sketch"]["reference"] == str(tmp_path / "sketch.npz")
    assert protocols["novel-a"]["reference"] == str(tmp_path / "shared.npz")
    assert {p["ref_per_class"] for p in protocols.values()} == {32}  # --set eval.* reaches a task with its own keys


@pytest.mark.parametrize("table, message", [
    ('eval = { refrence = "/x.npz" }', "[tasks.sketch]: unknown config key 'eval.refrence' (did you mean "
                                        "'eval.reference'?)"),
    ('eval = { fdd = "maybe" }', "[tasks.sketch]: eval.fdd must be auto, true or false"),
    ('eval = { ref_per_class = "many" }', "[tasks.sketch]: config key 'eval.ref_per_class'"),
    ('eval = "/x.npz"', "[tasks.sketch]: 'eval' must be a table"),
])
def test_bad_task_protocol_is_a_one_line_suite_error(tmp_path, table, message):
    text = SUITE.replace("[tasks.sketch]\n", f"[tasks.sketch]\n{table}\n")
    assert text != SUITE
    with pytest.raises(SuiteError) as err:
        load_suite(write_suite(tmp_path, text, "bad-eval.toml"))
    assert message in str(err.value) and "\n" not in str(err.value)


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


DOMAIN_SETS = ("celebahq", "hubble", "mri", "pokemon")


def placed_imagenet(tmp_path, monkeypatch):
    """Empty stand-ins for what the cluster suites expect (the preflight checks paths only): ImageNet latent caches
    and references, and kind-domain's four sets (latent caches whose manifests give a class count, as budget
    matching reads it, and one reference batch each)."""
    for folder in ("lat/novel461", "lat/pretrain150", "lat/imagenet1k", "weights", "vae", "refs",
                   *(f"lat/{name}" for name in DOMAIN_SETS)):
        (tmp_path / folder).mkdir(parents=True)
    for ref in ("imagenet-novel461-256.npz", "VIRTUAL_imagenet256_labeled.npz",
                *(f"{name}-256.npz" for name in DOMAIN_SETS), *(f"{name}-256-dinov2.npz" for name in DOMAIN_SETS)):
        (tmp_path / "refs" / ref).touch()
    for name in DOMAIN_SETS:
        (tmp_path / "lat" / name / "manifest.json").write_text('{"num_classes": 1}')
    for var, folder in (("KINDBENCH_LATENTS", "lat"), ("KINDBENCH_REFS", "refs"), ("KINDBENCH_WEIGHTS_DIR", "weights"),
                        ("KINDBENCH_VAE_DIR", "vae"), ("KINDBENCH_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / folder))


def test_tiny_runs_every_registered_method():
    from methods import list_methods
    from methods.registry import plugin_methods

    plan = build_plan("tiny", [])[1]
    assert {j.info["method"] for j in plan.by_step("evaluate")} == set(list_methods()) - set(plugin_methods())


@pytest.mark.parametrize("suite", ["kind-dit-b", "kind-dit-l", "fine-depth", "kind-domain", "kind-descend"])
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


@pytest.mark.parametrize("suite, ranks", [("kind-dit-b", (204, 72, 384)), ("kind-dit-l", (272, 96, 512))])
def test_kind_suites_run_the_paper_preset_with_a_full_rank_ablation_row(tmp_path, monkeypatch, suite, ranks):
    from methods import get_method

    placed_imagenet(tmp_path, monkeypatch)
    plan = build_plan(suite, [])[1]
    kind = {j.info["variant"]: j for j in plan.by_step("train") if j.info["method"] == "kind"}
    assert set(kind) == {"default", "full-rank"}
    pretrain = {j.job_id: j for j in plan.by_step("pretrain")}
    default, full = (pretrain[kind[v].info["ancestry_job"]] for v in ("default", "full-rank"))
    assert (default.info["ancestry"], full.info["ancestry"]) == ("kind", "kind-fullrank")
    assert default.config["method"]["options"] == {} and full.config["method"]["options"] == {"ranks": "full"}
    width = {"kind-dit-b": 768, "kind-dit-l": 1024}[suite]
    n_learngenes, n_tailors, half = ranks
    for job, expected in ((default, (n_learngenes, n_tailors)), (full, (half, half))):
        config = get_method("kind", job.config["method"]["options"]).config
        assert config.ancestry_ranks(width) == expected  # the default options are the paper preset
    assert kind["default"].run_id != kind["full-rank"].run_id
    assert {j.info["variant"] for j in plan.by_step("evaluate") if j.info["method"] == "kind"} == {"default",
                                                                                                  "full-rank"}


def test_kind_peft_suite_has_the_full_rank_row_apart_from_the_budget():
    suite = load_suite("kind-peft")
    kind = {s.variant: s for s in suite.methods if s.name == "kind"}
    assert set(kind) == {"default", "full-rank"}
    assert suite.ancestries[kind["full-rank"].ancestry].options == {"ranks": "full"}
    assert suite.ancestries[kind["default"].ancestry].options == {}
    assert kind_budget_options(suite, "novel461") == {}  # the preset, not the ablation row's ranks = "full"


def test_kind_budget_follows_the_default_kind_row_and_its_ancestry(tmp_path):
    def kind_suite(first: str, second: str, default_ancestry_options: str = "") -> str:
        head = textwrap.dedent(f'''
            [ancestries.kind]
            method = "kind"
            {default_ancestry_options}
            [ancestries.kind-fullrank]
            method = "kind"
            options = {{ ranks = "full" }}
        ''')
        entries = {"default": '[[methods]]\nname = "kind"\nancestry = "kind"\n',
                   "full-rank": '[[methods]]\nname = "kind"\nvariant = "full-rank"\nancestry = "kind-fullrank"\n'
                                'options = { train_learngene_sigma = true }\n'}  # an option that changes the count
        return SUITE + head + entries[first] + entries[second]

    for order in (("full-rank", "default"), ("default", "full-rank")):  # listed first or not: the default row wins
        suite = load_suite(write_suite(tmp_path, kind_suite(*order), "order.toml"))
        assert kind_budget_options(suite, "novel-a") == {}
    suite = load_suite(write_suite(tmp_path, kind_suite("full-rank", "default", 'options = { ranks = "full" }'),
                                   "ancestry.toml"))
    assert kind_budget_options(suite, "novel-a") == {"ranks": "full"}  # the ancestry's ranks decide the count
    assert kind_budget_options(load_suite(write_suite(tmp_path)), "novel-a") == {}  # no kind row: KIND's defaults


def test_kind_budget_matches_lora_to_the_paper_preset_on_dit_l(tmp_path, monkeypatch):
    """LoRA at KIND's budget on DiT-L/2 with 461 classes (meta-device builds: seconds): the full-rank row is listed
    first and must not set the budget; the rank is the largest whose count fits KIND's preset count (45.1M)."""
    from methods.base import ArchSpec
    from methods.budget import kind_trainable_count, trainable_count

    monkeypatch.setenv("KINDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    text = textwrap.dedent('''
        name = "budget-l"
        archs = ["DiT-L/2"]
        [defaults.model]
        in_channels = 4
        input_size = 32
        [protocol.eval]
        extractor = "synthetic"
        [ancestries.dense]
        method = "scratch"
        [ancestries.kind]
        method = "kind"
        [ancestries.kind-fullrank]
        method = "kind"
        options = { ranks = "full" }
        [tasks.novel461]
        num_classes = 461
        [[methods]]
        name = "kind"
        variant = "full-rank"
        ancestry = "kind-fullrank"
        [[methods]]
        name = "kind"
        ancestry = "kind"
        [[methods]]
        name = "lora"
        variant = "kind-budget"
        ancestry = "dense"
        budget = "kind"
    ''')
    suite = load_suite(write_suite(tmp_path, text, "budget-l.toml"))
    spec = next(s for s in suite.methods if s.budget)
    options = matched_budget_options(suite, spec, suite.tasks["novel461"], "DiT-L/2", 0)
    arch = ArchSpec("DiT-L/2")
    preset, full = kind_trainable_count(arch, 461), kind_trainable_count(arch, 461, {"ranks": "full"})
    assert 45_000_000 < preset <= 45_400_000 < full  # the paper's 45.4M is met by the preset only
    rank = options["rank"]
    assert trainable_count("lora", arch, 461, {"rank": rank}) <= preset < trainable_count("lora", arch, 461,
                                                                                          {"rank": rank + 1})


def test_kind_domain_suite_has_every_method_on_every_set_with_its_own_reference(tmp_path, monkeypatch):
    placed_imagenet(tmp_path, monkeypatch)
    plan = build_plan("kind-domain", [])[1]
    rows = {(j.info["task"], j.info["method"], j.info["variant"]) for j in plan.by_step("evaluate")}
    methods = {("kind", "default"), ("kind_fulltransfer", "default"), ("full", "default"), ("lora", "default"),
               ("lora", "kind-budget"), ("scratch", "default")}
    assert rows == {(task, *m) for task in DOMAIN_SETS for m in methods}
    for job in plan.by_step("train"):
        assert job.info["task_stage"] == "domain" and job.info["arch"] == "DiT-B/2"
        assert job.config["data"]["latent_dir"] == f"${{KINDBENCH_LATENTS}}/{job.info['task']}"
    prepares = {j.info["task"]: j for j in plan.by_step("prepare")}
    assert set(prepares) == set(DOMAIN_SETS)
    for job in [*plan.by_step("evaluate"), *prepares.values()]:
        assert job.info["eval"]["reference"] == f"${{KINDBENCH_REFS}}/{job.info['task']}-256.npz"
        assert job.info["eval"]["fdd"] == "true" and job.info["eval"]["extractor"] == "inception"
        # FDD against the set's own DINOv2 statistics, not the ImageNet ones in the weights folder
        assert job.info["eval"]["fdd_reference"] == f"${{KINDBENCH_REFS}}/{job.info['task']}-256-dinov2.npz"
    for job in plan.by_step("evaluate"):
        assert job.info["prepare_job"] == prepares[job.info["task"]].job_id
    from methods import get_method

    lora = {j.info["variant"]: j.config["method"]["options"] for j in plan.by_step("train")
            if j.info["method"] == "lora" and j.info["task"] == "mri"}
    assert lora["default"] == {} and lora["kind-budget"]["rank"] > get_method("lora").config.rank  # matched, larger
    # kind-dit-b's ancestries, not new ones: the two 300K-step runs are shared by both suites
    shared = {j.job_id for j in build_plan("kind-dit-b", [])[1].by_step("pretrain")}
    assert {j.info["ancestry"] for j in plan.by_step("pretrain")} == {"dense", "kind"}
    assert {j.job_id for j in plan.by_step("pretrain")} <= shared


@pytest.mark.parametrize("remove, named", [
    ("lat/hubble", "lat/hubble"),           # the set's latent cache (budget matching reads its manifest first)
    ("refs/hubble-256.npz", "refs/hubble-256.npz"),   # its reference batch: the preflight names the task
    ("refs/hubble-256-dinov2.npz", "refs/hubble-256-dinov2.npz"),   # its FDD reference
])
def test_kind_domain_names_a_missing_set_before_running(tmp_path, monkeypatch, remove, named):
    import shutil

    placed_imagenet(tmp_path, monkeypatch)
    path = tmp_path / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(SuiteError) as err:
        build_plan("kind-domain", [])
    assert str(tmp_path / named) in str(err.value)
    assert not any(name in str(err.value) for name in ("celebahq", "/mri", "pokemon"))


def test_kind_descend_suite_gives_every_method_the_same_descendant_sizes(tmp_path, monkeypatch):
    placed_imagenet(tmp_path, monkeypatch)
    plan = build_plan("kind-descend", [])[1]
    archs = {"DiT-B/2-d4", "DiT-B/2-d6", "DiT-B/2-d8"}
    runs: dict[str, set] = {}
    for job in plan.by_step("evaluate"):
        runs.setdefault(job.info["method"], set()).add(job.info["arch"])
        assert job.info["task_stage"] == "descend"
    assert runs == {m: archs for m in ("kind", "fine", "wave", "tleg", "scratch")}
    pretrain = {j.job_id: j for j in plan.by_step("pretrain")}
    for job in plan.by_step("train"):
        if job.info["method"] == "scratch":
            continue
        ancestry = pretrain[job.info["ancestry_job"]]
        if job.info["method"] in ("fine", "wave"):  # phase 2 on a phase-1 run at the same depth
            assert ancestry.info["arch"] == job.info["arch"] and job.config["method"]["options"] == {"train": "all"}
            assert ancestry.config["data"]["subset_fraction"] == 0.01
            phase1 = {"fine": "sigma", "wave": "scalers"}[job.info["method"]]
            assert ancestry.config["method"]["options"] == {"train": phase1}
            ancestry = pretrain[ancestry.deps[0]]
        assert ancestry.info["arch"] == "DiT-B/2"  # every learngene comes from a 12-block DiT-B/2
    teachers = {pretrain[j.deps[0]].info["ancestry"] for j in pretrain.values()
                if j.info["ancestry"] in ("tleg", "wave")}
    assert teachers == {"dense"}
    shared = {j.job_id for j in build_plan("kind-dit-b", [])[1].by_step("pretrain")}
    assert {j.job_id for j in pretrain.values() if j.info["ancestry"] in ("dense", "kind")} <= shared


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


def test_a_protocol_word_setting_keeps_the_word_typed_on_the_command_line():
    """``--set eval.fdd=false`` is the word "false" (the setting is a str), not a bool rejected by its type."""
    from bench.pipeline.executor import parse_sets

    _, protocol = parse_sets(["eval.fdd=false", "sample.num_samples=8", "eval.reference=/x/ref.npz"])
    assert protocol["eval"] == {"fdd": "false", "reference": "/x/ref.npz"} and protocol["sample"]["num_samples"] == 8


def test_the_suite_fdd_setting_reaches_the_evaluator_as_its_own_words():
    from bench.config.schema import EvalConfig
    from bench.pipeline.steps.scoring import FDD_MODES

    assert set(FDD_MODES) == {"auto", "true", "false"} and FDD_MODES["true"] == "on" and FDD_MODES["false"] == "off"
    for word in FDD_MODES:
        EvalConfig(fdd=word)  # every suite value has a meaning for the evaluator


def test_an_evaluated_ancestry_is_sampled_and_scored_on_its_own_classes():
    """tiny scores its dense and KIND ancestries (a gated KIND ancestry samples each class through its tailors)."""
    plan = build_plan("tiny", [])[1]
    rows = {j.info["variant"]: j for j in plan.by_step("evaluate") if j.info["benchmark"] == "ancestry--DiT-T-2"}
    assert set(rows) == {"dense", "kind", "kind-nogate"}
    pretrain = {j.info["ancestry"]: j for j in plan.by_step("pretrain")}
    for name, evaluation in rows.items():
        sample = plan.jobs[evaluation.info["sample_job"]]
        assert sample.deps == (pretrain[name].job_id,) and sample.run_id == pretrain[name].run_id
        prepare = plan.jobs[evaluation.info["prepare_job"]]
        assert prepare.info["data"]["split"] == "pretrain"  # the ancestry's own classes, held-out images
        assert evaluation.job_id in plan.by_step("aggregate")[0].deps
    # the same data and protocol: one reference, so the ancestries are ranked together
    assert len({e.info["prepare_job"] for e in rows.values()}) == 1
    assert rows["kind"].info["method"] == "kind" and rows["kind"].info["task_stage"] == "ancestry"


@pytest.mark.parametrize("value, message", [
    ("3", "evaluate must be true, false or a table"),
    ('{ fdd = "maybe" }', "eval.fdd must be auto, true or false"),
])
def test_a_bad_ancestry_evaluate_setting_is_one_line(tmp_path, value, message):
    text = SUITE.replace('[ancestries.dense]', f'[ancestries.dense]\nevaluate = {value}', 1)
    with pytest.raises(SuiteError, match=message):
        build_plan(write_suite(tmp_path, text), [])


def test_a_shared_ancestry_seed_trains_each_ancestry_once_and_every_seed_samples_with_its_own_noise(tmp_path):
    three = SUITE.replace("seeds = [0]", "seeds = [0, 1, 2]")
    per_seed = make_plan(load_suite(write_suite(tmp_path, three, "per-seed.toml")))
    assert len(per_seed.by_step("pretrain")) == 3
    shared = make_plan(load_suite(write_suite(tmp_path, "ancestry_seed = 0\n" + three, "shared.toml")))
    (ancestry,) = shared.by_step("pretrain")
    assert all(job.deps == (ancestry.job_id,) for job in shared.by_step("train") if job.info["ancestry_job"])
    assert len(shared.by_step("train")) == 18  # 3 methods x 2 tasks x 3 seeds
    seeds = {(job.info["method"], job.info["task"], job.info["seed"]): job.info["sample"]["seed"]
             for job in shared.by_step("sample")}
    assert {seeds[("full", "novel-a", s)] for s in (0, 1, 2)} == {0, 1, 2}
    # the shared ancestry, scored, is sampled once per seed: its leaderboard row has the suite's three seeds too
    scored = ("ancestry_seed = 0\n" + three).replace("[ancestries.dense]", "[ancestries.dense]\nevaluate = true", 1)
    plan = make_plan(load_suite(write_suite(tmp_path, scored, "scored.toml")))
    (ancestry,) = plan.by_step("pretrain")
    samples = [job for job in plan.by_step("sample") if job.deps == (ancestry.job_id,)]
    assert sorted((job.info["seed"], job.info["sample"]["seed"]) for job in samples) == [(0, 0), (1, 1), (2, 2)]
    assert len({job.job_id for job in plan.by_step("evaluate") if job.info["task"] == "ancestry"}) == 3
    with pytest.raises(SuiteError, match="ancestry_seed must be an integer"):
        load_suite(write_suite(tmp_path, 'ancestry_seed = "zero"\n' + three, "bad.toml"))
