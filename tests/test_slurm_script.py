"""The batch script and the pipeline agree on the names of the job steps (a renamed step must not silently lose
its checkpoint-and-requeue handling)."""

import re

from trainrun import REPO

from bench.pipeline import slurm
from bench.pipeline.plan import STEPS


def test_the_batch_script_names_the_training_steps_of_the_pipeline():
    script = (REPO / "slurm" / "job.sbatch").read_text()
    (case,) = re.findall(r'^\s*([\w|"]+)\) RUN_DIR=', script, flags=re.M)
    named = {name.strip('"') for name in case.split("|")} - {""}
    assert named <= set(STEPS)
    assert named == {"pretrain", "train"} == set(slurm.REQUEUED_STEPS) - {"sample"}
