"""Every run of the embedded suites can be built from its ancestry, before anything is trained.

A suite that pairs a method with a task it cannot do (KIND asked for a wider or deeper descendant than its
factors allow) otherwise fails only when that run starts, after hours of pre-training. Here each pre-training
and transfer run of seed 0 is built exactly as ``bench.run.train.build_model`` builds it, from an export of its
ancestry's freshly built (untrained) model, in plan order; shapes and method checks are what can fail, not values.
"""

from __future__ import annotations

import pytest

from bench.config.schema import from_dict
from bench.config.suite import load_suite
from bench.data.factory import build_dataset
from bench.data.identity import label_space
from bench.pipeline.plan import make_plan, resolve_budgets
from bench.run.train import build_model
from methods.transfer import save_export


@pytest.mark.parametrize("suite_name", ["tiny", "small"])
def test_every_run_of_seed_0_builds_from_its_ancestry(tmp_path, suite_name):
    suite = load_suite(suite_name)
    plan = make_plan(suite, None, resolve_budgets(suite))
    built, failures = 0, []
    for job in plan.jobs.values():  # dependency order: an ancestry's export is written before its users build
        if job.step not in ("pretrain", "train") or job.info.get("seed", 0) != 0:
            continue
        cfg = from_dict({**job.config, "run": {**job.config["run"], "out_dir": str(tmp_path)}})
        num_classes = build_dataset(cfg.data, cfg.model).num_classes
        try:
            method, model, _ = build_model(cfg, num_classes)
        except Exception as error:  # noqa: BLE001 - every unbuildable run is listed, not only the first
            failures.append(f"{job.job_id}: {type(error).__name__}: {error}")
            continue
        save_export(tmp_path / job.run_id / "export.safetensors", model.state_dict(), method=method.name,
                    arch=cfg.model.arch_spec(), num_classes=num_classes,
                    meta={"stage": cfg.method.stage, "method_options": method.config.to_dict(),
                          "label_space": label_space(cfg.data) or None})
        built += 1
    assert not failures, "\n".join(failures)
    assert built >= len({j.info.get("method") for j in plan.jobs.values() if j.step == "train"})
