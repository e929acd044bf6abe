"""A user's run trusts only what it can see: outputs checked against their sha256, code fingerprints, inputs that
are the ones consumed, the sampling protocol in the sample job, and published results never written over."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from trainrun import REPO

from bench.pipeline.executor import build_plan, default_results, run_local
from bench.pipeline.jobs import Roots
from bench.pipeline.status import plan_states

MINI = str(REPO / "tests" / "suites" / "mini.toml")


def _run(roots: Roots, *sets: str):
    suite, plan = build_plan(MINI, list(sets))
    summary = run_local(plan, roots, jobs=1, console=Console(file=open(os.devnull, "w")))
    return plan, summary


def _finished(roots: Roots) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["run_info"]["finished_at"]
            for p in (roots.results / "records").glob("*.json")}


@pytest.fixture(scope="module")
def finished_mini(tmp_path_factory):
    """The mini suite run once (in this process, one job at a time); tests work on copies of its runs folder."""
    base = tmp_path_factory.mktemp("mini")
    roots = Roots(base / "runs", default_results(base / "runs", "mini"))
    plan, summary = _run(roots)
    assert summary["outcomes"] == {"ran": len(plan.jobs), "done": 0, "failed": 0, "blocked": 0, "stopped": 0}
    return base / "runs"


@pytest.fixture
def mini_copy(finished_mini, tmp_path):
    """A copy of the finished run: records name outputs relative to the runs root, so the copy is complete."""
    runs = tmp_path / "runs"
    shutil.copytree(finished_mini, runs)
    return Roots(runs, default_results(runs, "mini"))


def test_a_finished_suite_runs_nothing_again_even_after_a_move(mini_copy):
    before = _finished(mini_copy)
    plan, summary = _run(mini_copy)
    assert summary["outcomes"]["ran"] == 0 and summary["outcomes"]["done"] == len(plan.jobs)
    assert _finished(mini_copy) == before


def test_deleting_an_artefact_reruns_exactly_that_job_and_its_dependants(mini_copy):
    suite, plan = build_plan(MINI, [])
    transfer = next(j for j in plan.by_step("train") if j.info["method"] == "lora")
    (mini_copy.runs / transfer.run_id / "export.safetensors").unlink()
    states = plan_states(plan, mini_copy)
    assert states[transfer.job_id].state == "missing" and "export" in states[transfer.job_id].reason
    before = _finished(mini_copy)
    _run(mini_copy)
    after = _finished(mini_copy)
    rerun = {job for job in before if after[job] != before[job]}
    lora_jobs = {j.job_id for j in plan.jobs.values() if j.run_id == transfer.run_id}
    aggregate = {j.job_id for j in plan.by_step("aggregate")}
    assert rerun == lora_jobs | aggregate
    assert (mini_copy.runs / transfer.run_id / "export.safetensors").is_file()


def test_a_changed_output_is_not_trusted(mini_copy):
    suite, plan = build_plan(MINI, [])
    prepare = plan.by_step("prepare")[0]
    record = json.loads((mini_copy.results / "records" / f"{prepare.job_id}.json").read_text())
    path = mini_copy.runs / record["outputs"]["reference"]["path"]
    path.write_bytes(path.read_bytes() + b"\0")
    states = plan_states(plan, mini_copy)
    assert states[prepare.job_id].state == "changed"
    assert all(states[j.job_id].state == "upstream" for j in plan.by_step("evaluate"))
    assert all(not states[j.job_id].todo for j in plan.by_step("train"))


def test_the_sampling_protocol_belongs_to_the_sample_job(mini_copy):
    """Train once, sample with two step counts: two sample files, each record stating the steps it used; the
    training config and records are untouched."""
    trained = _finished(mini_copy)
    plans = {steps: _run(mini_copy, f"sample.num_steps={steps}")[0] for steps in (2, 3)}
    after = _finished(mini_copy)
    for job_id in trained:
        if job_id.endswith(("--train", "--pretrain")):
            assert after[job_id] == trained[job_id]
    digests = {}
    for steps, plan in plans.items():
        for job in plan.by_step("sample"):
            record = json.loads((mini_copy.results / "records" / f"{job.job_id}.json").read_text())
            assert record["sample_info"]["num_steps"] == steps
            assert record["run_info"]["protocol_settings"]["num_steps"] == steps
            assert "sample" not in record["run_info"]["config"]  # the training config carries no sampling
            digests[(steps, job.run_id)] = record["outputs"]["samples"]["sha256"]
            npz = mini_copy.runs / record["outputs"]["samples"]["path"]
            assert hashlib.sha256(npz.read_bytes()).hexdigest() == record["outputs"]["samples"]["sha256"]
    for run_id in {r for _, r in digests}:
        assert digests[(2, run_id)] != digests[(3, run_id)]


def test_transfer_records_carry_complete_provenance(mini_copy):
    suite, plan = build_plan(MINI, [])
    store_records = mini_copy.results / "records"
    for job in plan.by_step("train"):
        record = json.loads((store_records / f"{job.job_id}.json").read_text())
        info, train = record["run_info"], record["train_info"]
        assert info["code"]["fingerprint"] and info["inputs"].keys() == set(job.deps)
        assert train["data"]["sha256"] and train["data"]["section"]["split"] == "novel-a"
        assert train["peak_mem_kind"].startswith(("cpu_rss_growth", "cuda"))
        if job.info["method"] == "lora":  # every option, defaults included, not only the overrides ({})
            assert train["method_options"]["rank"] > 0 and "alpha" in train["method_options"]
        if info["ancestry"]:
            parent = json.loads((store_records / f"{info['ancestry']['job_id']}.json").read_text())
            assert info["ancestry"]["sha256"] == parent["outputs"]["export"]["sha256"] != ""
    peaks = {json.loads((store_records / f"{j.job_id}.json").read_text())["train_info"]["peak_mem_gb"]
             for j in plan.by_step("train")}
    assert len(peaks) > 1  # the run's own peak, not the worker process's lifetime peak shared by every run


def _clone(tmp_path: Path) -> Path:
    """A fresh clone of this repository's HEAD (what git holds, committed results included)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True, timeout=300)
    return clone


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_fresh_clone_runs_the_readme_command_without_touching_shipped_results(tmp_path):
    """The README's run command in a fresh clone, on the reduced suite: every job runs, exit 0, the shipped files
    under results/ are byte-identical afterwards, a second invocation runs nothing; then an edited method source
    makes exactly its jobs stale."""
    clone = _clone(tmp_path)
    shipped = _tree_digest(clone / "results")
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bench.cli", "run", "--suite", "tests/suites/mini.toml"]
    first = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    results = clone / "runs" / "results" / "mini"
    summary = json.loads((results / "last_run.json").read_text())
    assert summary["outcomes"]["ran"] == 12 and summary["outcomes"]["failed"] == 0
    record = json.loads(next((results / "records").glob("*--train.json")).read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    assert record["run_info"]["git_sha"] == head  # the clone's code ran, not this checkout's
    assert _tree_digest(clone / "results") == shipped

    second = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((results / "last_run.json").read_text())["outcomes"]["ran"] == 0

    # a comment is not behaviour: nothing becomes stale
    adapter = clone / "baselines" / "peft_adapter.py"
    source = adapter.read_text()
    adapter.write_text(source + "\n# a comment\n")
    again = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads((results / "last_run.json").read_text())["outcomes"]["ran"] == 0
    # an edit to LoRA's code makes LoRA's jobs stale and nothing else
    adapter.write_text(source + "\n_EDITED = True\n")
    plan = subprocess.run([sys.executable, "-m", "bench.cli", "plan", "--suite", "tests/suites/mini.toml", "--json"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0, plan.stderr[-2000:]
    probe = ("import json, sys; from bench.pipeline.executor import build_plan; "
             "from bench.pipeline.jobs import Roots; "
             "from bench.pipeline.status import plan_states; p = build_plan('tests/suites/mini.toml', [])[1]; "
             "s = plan_states(p, Roots('runs', 'runs/results/mini')); "
             "print(json.dumps({k: [v.state, p.jobs[k].info.get('method', '')] for k, v in s.items()}))")
    states = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=clone, env=env, capture_output=True,
                                       text=True, timeout=600, check=True).stdout)
    stale = {job for job, (state, method) in states.items() if state == "stale"}
    assert stale and all(states[job][1] == "lora" for job in stale)
    assert {states[job][0] for job in states if states[job][1] not in ("lora", "")} == {"done"}
    board = subprocess.run([sys.executable, "-m", "bench.cli", "leaderboard", "--records", str(results), "--out",
                            str(tmp_path / "board")], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert board.returncode == 0, board.stderr[-2000:]
    rows = (tmp_path / "board" / "novel-a--DiT-T-2" / "leaderboard.csv").read_text().splitlines()
    header = rows[0].split(",")
    lora = [dict(zip(header, r.split(","))) for r in rows[1:] if ",lora," in r]
    assert lora and all(row["stale"] and not row["rank"] for row in lora)


def test_every_method_declares_its_family_and_the_plan_takes_it_from_there():
    from methods import get_method_class, list_methods

    families = {name: get_method_class(name).family for name in list_methods()}
    assert all(families.values()), [n for n, f in families.items() if not f]
    assert families["kind"] == "learngene" and families["lora"] == "peft" and families["scratch"] == "pretrain"
    suite, plan = build_plan(MINI, [])
    for job in plan.by_step("train"):
        assert job.info["family"] == families[job.info["method"]]


def test_make_plan_is_pure_and_budgets_are_resolved_before_it(tmp_path, monkeypatch):
    """make_plan builds no model and writes no file; budget-matched ranks come from their own step."""
    import torch

    from bench.config.suite import SuiteError, load_suite
    from bench.pipeline.plan import make_plan, resolve_budgets

    suite_file = tmp_path / "budget.toml"
    suite_file.write_text(Path(MINI).read_text() + '\n[ancestries.kind]\nmethod = "kind"\n'
                          'overrides = { data = { split = "pretrain" } }\n\n[[methods]]\nname = "kind"\n'
                          'ancestry = "kind"\ntasks = ["novel-a"]\n\n[[methods]]\nname = "lora"\n'
                          'variant = "kind-budget"\nancestry = "dense"\nbudget = "kind"\ntasks = ["novel-a"]\n')
    monkeypatch.setenv("KINDBENCH_CACHE_DIR", str(tmp_path / "cache"))
    suite = load_suite(str(suite_file))
    with pytest.raises(SuiteError, match="not resolved"):
        make_plan(suite)
    budgets = resolve_budgets(suite)  # the impure step: meta-device builds, the rank cache
    assert (tmp_path / "cache" / "budget_ranks.json").is_file()
    (tmp_path / "cache" / "budget_ranks.json").unlink()
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *a, **k: built.append(type(self)))
    plan = make_plan(suite, None, budgets)
    assert not built and not (tmp_path / "cache" / "budget_ranks.json").exists()
    lora = [j for j in plan.by_step("train") if j.info["variant"] == "kind-budget"]
    assert lora and lora[0].config["method"]["options"]["rank"] != 16  # matched, not the standard rank


@pytest.mark.parametrize("sets,message", [
    (["eval.extractr=inception"], "did you mean 'eval.extractor'"),
    (["sample.num_steps=many"], "sample.num_steps"),
    (["sample.num_step=3"], "did you mean 'sample.num_steps'"),
    (["schedule.step=3"], "did you mean 'schedule.steps'"),
    (["sample.scheduler=ddpn"], "sample.scheduler must be one of ddpm, ddim, dpm++"),
])
def test_protocol_and_config_mistakes_in_set_are_one_line_errors(sets, message):
    from bench.config.suite import SuiteError

    with pytest.raises(SuiteError, match=message.replace(".", r"\.")) as err:
        build_plan(MINI, sets)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("line,message", [('seeds = "012"', "seeds must be a non-empty list of integers"),
                                          ('archs = "DiT-T/2"', "archs must be a non-empty list")])
def test_suite_lists_are_lists(tmp_path, line, message):
    from bench.config.suite import SuiteError, load_suite

    text = Path(MINI).read_text().replace('seeds = [0]', line if line.startswith("seeds") else "seeds = [0]")
    if line.startswith("archs"):
        text = text.replace('archs = ["DiT-T/2"]', line)
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(SuiteError, match=message):
        load_suite(str(tmp_path / "s.toml"))


@pytest.mark.parametrize("old,new,message", [
    ('in_channels = 3', 'in_channels = 0', "model.in_channels must be positive"),  # [defaults.model]
    ('source = "synthetic"', 'source = "synthetc"', "data.source"),  # [defaults.data]
    ('lr = 1e-3', 'lr = "fast"', "'optim.lr' expects float"),  # [defaults.optim]
    ('steps = 3', 'steps = 3\nwarmup = 2', "unknown config key 'schedule.warmup'"),  # [defaults.schedule]
    ('scheduler = "ddpm"', 'scheduler = "ddpn"', "sample.scheduler must be one of"),  # [protocol.sample]
    ('ref_per_class = 4', 'ref_per_class = 4\nbogus = 1', "unknown config key 'eval.bogus'"),  # [protocol.eval]
    ('method = "scratch"', 'method = "scratch"\noptions = { bogus = 1 }', "unknown option 'bogus'"),  # ancestries
    ('stage = "transfer"', 'stage = "transfr"', "stage must be one of"),  # [tasks.*]
    ('name = "lora"', 'name = "lora"\noptions = { rnk = 4 }', "unknown option 'rnk'"),  # [[methods]] options
    ('name = "lora"', 'name = "lorra"', "unknown method 'lorra'"),  # [[methods]] name
])
def test_the_suite_loader_rejects_a_bad_setting_in_any_section_before_anything_runs(tmp_path, old, new, message):
    """One mistake per section of a suite: ``kindbench plan`` refuses in one line, before a job is planned."""
    text = Path(MINI).read_text()
    assert old in text
    (tmp_path / "bad.toml").write_text(text.replace(old, new, 1))
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "plan", "--suite", str(tmp_path / "bad.toml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
