"""Realistic run records for the store, leaderboard and plot tests (shared; tests/ is on sys.path).

``write_fixture_store(root)`` writes, through the real ``RecordStore``, a small but complete results tree:

benchmark ``novel-a--DiT-T-2`` (protocol P1 = synthetic extractor, 1000 samples, cfg 1.5, ddpm 50 steps):

=========  =========  =====  =========  ==============  =========  ======================
method     family     seeds  trainable  train GMACs     FID        note
=========  =========  =====  =========  ==============  =========  ======================
kind       learngene  0, 1   120 000    960             20, 22     ancestry run upstream
lora r4    peft       0, 1   30 000     1152            25, 27     seed 2 transfer FAILED
bitfit     peft       0      60 000     768             30         seed 1 sample CANCELLED
full       full_ft    0      800 000    1536            19
=========  =========  =====  =========  ==============  =========  ======================

Pareto (FID vs trainable params): lora, kind, full (bitfit is dominated by lora).
Pareto (FID vs training GMACs): bitfit, kind, full (lora is dominated by kind).

Protocol P2 (Inception extractor, another reference) scores kind s0 and lora s0 again: a separate ranking.
Benchmark ``novel-b--DiT-T-2`` holds one kind run, to check one leaderboard per benchmark.

Every record is *current*, as ``bench.pipeline.jobs`` writes it from this checkout: ``run_info.code`` is this
checkout's code fingerprint of its step and method (``bench.records.fingerprint.code_fingerprint``, looked up
when written, so a test that
monkeypatches it there gets records that agree) and ``run_info.inputs`` the digests of the records it depends on.
Methods are registered names (``full`` is the registry's full fine-tuning, family ``full_ft``), so
``bench.records.currency.stale_reason`` finds every fixture record current and a test makes one stale by editing it.

The end of the file has ``simple_record`` and the worker functions of the store's concurrency tests: spawned
processes import this module, so it imports only ``bench.records.store`` at the top (numpy and PIL lazily).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bench.records.store import RecordStore, metric, new_record, new_run_info

GIT = {"git_sha": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False}
META = {"hostname": "node001", "python": "3.11.7", "world_size": 1, "packages": {"torch": "2.14.1"}}
HIB = {"fid": False, "sfid": False, "is": True, "precision": True, "recall": True, "fdd": False}

P1 = {"n_samples": 1000, "extractor": "kindbench-synthetic-v1", "extractor_sha256": "e1" * 32,
      "reference_id": "novel-a-train", "reference_sha256": "r1" * 32, "cfg_scale": 1.5, "sampler": "ddpm",
      "num_steps": 50, "clip_denoised": False}
P2 = {**P1, "extractor": "inception-v3-tf", "extractor_sha256": "e2" * 32, "reference_id": "novel-a-val",
      "reference_sha256": "r2" * 32}

# (method, family, variant, seed) -> training numbers and P1 metrics
RUNS = {
    ("kind", "learngene", "default", 0): dict(trainable=120_000, total=800_000, gmacs=0.05, images=6400, wall=360.0,
                                            gpu_h=0.10, fid=20.0, sfid=30.0, is_=5.0, prec=0.60, rec=0.40, fdd=150.0),
    ("kind", "learngene", "default", 1): dict(trainable=120_000, total=800_000, gmacs=0.05, images=6400, wall=432.0,
                                            gpu_h=0.12, fid=22.0, sfid=32.0, is_=5.4, prec=0.62, rec=0.44, fdd=160.0),
    ("lora", "peft", "r4", 0): dict(trainable=30_000, total=830_000, gmacs=0.06, images=6400, wall=300.0,
                                    gpu_h=0.08, fid=25.0, sfid=35.0, is_=4.5, prec=0.55, rec=0.38, fdd=170.0),
    ("lora", "peft", "r4", 1): dict(trainable=30_000, total=830_000, gmacs=0.06, images=6400, wall=310.0,
                                    gpu_h=0.09, fid=27.0, sfid=36.0, is_=4.3, prec=0.57, rec=0.36, fdd=175.0),
    ("bitfit", "peft", "default", 0): dict(trainable=60_000, total=800_000, gmacs=0.04, images=6400, wall=200.0,
                                           gpu_h=0.05, fid=30.0, sfid=40.0, is_=4.0, prec=0.50, rec=0.30, fdd=190.0),
    ("full", "full_ft", "default", 0): dict(trainable=800_000, total=800_000, gmacs=0.04, images=12800,
                                            wall=900.0, gpu_h=0.25, fid=19.0, sfid=29.0, is_=5.8, prec=0.58,
                                            rec=0.47, fdd=140.0),
}
P2_FID = {("kind", 0): 40.0, ("lora", 0): 35.0}  # under P2 lora wins: rankings must not mix protocols


def run_id_of(method: str, variant: str, benchmark: str, seed: int) -> str:
    digest = hashlib.sha256(f"{method}/{variant}/{benchmark}/{seed}".encode()).hexdigest()[:8]
    return f"{method}--{variant}--{benchmark}--s{seed}--{digest}"


def _info(step: str, run_id: str, benchmark: str, method: str, family: str, variant: str, seed: int,
          depends_on: list[str], job_suffix: str = "") -> dict:
    task = benchmark.split("--")[0]
    return new_run_info(job_id=f"{run_id}--{step}{job_suffix}", run_id=run_id, step=step, suite="tiny",
                        benchmark=benchmark, task=task, arch="DiT-T/2", method=method, family=family,
                        variant=variant, seed=seed,
                        config={"method": {"name": method, "stage": "transfer"}, "seed": seed},
                        config_hash=run_id.rsplit("--", 1)[-1], depends_on=depends_on, git=GIT,
                        created_at="2025-03-01T10:00:00.000+00:00")


def _finish(info: dict, **blocks) -> dict:
    status = blocks.pop("status", "success")
    error = blocks.pop("error", None)
    return new_record(info, status=status, error=error, meta_info=META,
                      finished_at="2025-03-01T10:30:00.000+00:00", **blocks)


def current_code(step: str, method: str) -> dict:
    """``run_info.code`` of a ``step`` job of ``method`` made by this checkout
    (as ``bench.pipeline.jobs`` records it)."""
    from bench.records.fingerprint import code_fingerprint  # lazy: the store tests' worker processes import this

    return code_fingerprint(step, method or None)


def stamp_current(store: RecordStore, record: dict) -> dict:
    """``record`` with the ``code`` and ``inputs`` blocks ``bench.pipeline.jobs`` writes into run_info: this checkout's
    fingerprint and the digest of every dependency record now in ``store`` (so the record is current)."""
    from bench.records.currency import record_digest

    info = record["run_info"]
    info["code"] = current_code(info["step"], info["method"])
    deps = {dep: store.read(dep) for dep in info["depends_on"]}
    info["inputs"] = {dep: record_digest(dep_record) for dep, dep_record in deps.items() if dep_record is not None}
    return record


def write_current(store: RecordStore, record: dict) -> None:
    store.write(stamp_current(store, record))


def train_info(numbers: dict, loss_curve: str | None) -> dict:
    return {"steps": numbers["images"] // 32, "images_seen": numbers["images"], "global_batch": 32, "world_size": 1,
            "wall_s": numbers["wall"], "gpu_hours": numbers["gpu_h"], "peak_mem_gb": 0.4, "final_loss": 0.12,
            "loss_curve": loss_curve,
            "accounting": {"params_total": numbers["total"], "params_trainable": numbers["trainable"],
                           "params_inherited": numbers["total"] - numbers["trainable"],
                           "params_new": numbers["trainable"], "stored_bytes": 4 * numbers["trainable"],
                           "gmacs_fwd_trained": numbers["gmacs"], "gmacs_fwd_sampled": 0.04},
            "train_gmacs_total": numbers["gmacs"] * 3 * numbers["images"]}


def eval_info(numbers: dict, protocol: dict, fid: float | None = None) -> dict:
    values = {"fid": numbers["fid"] if fid is None else fid, "sfid": numbers["sfid"], "is": numbers["is_"],
              "precision": numbers["prec"], "recall": numbers["rec"], "fdd": numbers["fdd"]}
    return {"metrics": {name: metric(value, HIB[name]) for name, value in values.items()}, "protocol": dict(protocol)}


def _artefacts(root: Path, run_id: str, seed: int) -> tuple[str, str]:
    """A train.jsonl and a sample-grid PNG for the run, as the train and sample stages leave them."""
    import numpy as np  # lazy: the concurrency tests' worker processes import this module and need neither
    from PIL import Image

    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    rate = 0.02 + int(hashlib.sha256(run_id.encode()).hexdigest()[:4], 16) / 65536 * 0.08  # a different curve per run
    lines = [{"step": step, "loss": 0.1 + 0.9 / (1 + rate * step) + 0.01 * seed, "lr": 1e-4}
             for step in range(0, 200, 10)]
    (run_dir / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rng = np.random.default_rng(seed + len(run_id))
    Image.fromarray(rng.integers(0, 256, (34, 34, 3), dtype=np.uint8)).save(run_dir / "grid.png")
    return f"runs/{run_id}/train.jsonl", f"runs/{run_id}/grid.png"


def write_run(store: RecordStore, benchmark: str, key: tuple, numbers: dict, ancestry_job: str | None) -> dict:
    """transfer -> sample -> evaluate(P1) records of one seed-run; returns their job ids."""
    method, family, variant, seed = key
    run_id = run_id_of(method, variant, benchmark, seed)
    loss_curve, grid = _artefacts(store.root, run_id, seed)
    transfer = _info("train", run_id, benchmark, method, family, variant, seed,
                     [ancestry_job] if ancestry_job else [])
    write_current(store, _finish(transfer, train_info=train_info(numbers, loss_curve)))
    sample = _info("sample", run_id, benchmark, method, family, variant, seed, [transfer["job_id"]])
    write_current(store, _finish(sample, sample_info={
        "npz": f"runs/{run_id}/samples.npz", "npz_sha256": "s" * 64, "num_samples": 1000, "scheduler": "ddpm",
        "num_steps": 50, "cfg_scale": 1.5, "label_mode": "uniform", "seed": seed, "grid_png": grid,
        "clip_denoised": False}))
    # KIND's evaluation lists its ancestry too (first): the join must still pick the run's own transfer
    upstream = ([ancestry_job] if ancestry_job else []) + [sample["job_id"]]
    evaluate = _info("evaluate", run_id, benchmark, method, family, variant, seed, upstream)
    write_current(store, _finish(evaluate, eval_info=eval_info(numbers, P1)))
    return {"run_id": run_id, "sample": sample["job_id"], "evaluate": evaluate["job_id"]}


def write_fixture_store(root: Path) -> RecordStore:
    store = RecordStore(root)
    bench_a = "novel-a--DiT-T-2"
    # A suite-level job (no benchmark): counted in the status summary, no leaderboard of its own.
    prepare = _info("prepare", "prepare--novel-a--0000abcd", "", "", "", "", 0, [])
    write_current(store, _finish(prepare, extra={"reference": {"path": "refs/novel-a.npz", "sha256": "f" * 64}}))
    # The KIND ancestry: a separate run whose training cost must not be mistaken for the transfer's.
    ancestry = _info("pretrain", "kind--ancestry--DiT-T-2--s0--aaaa0000", bench_a, "kind", "learngene", "default",
                     0, [])
    anc_numbers = dict(RUNS[("kind", "learngene", "default", 0)], trainable=900_000, images=64_000, gpu_h=2.0)
    write_current(store, _finish(ancestry, train_info=train_info(anc_numbers, None)))
    jobs = {}
    for key, numbers in RUNS.items():
        jobs[key] = write_run(store, bench_a, key, numbers, ancestry["job_id"] if key[0] == "kind" else None)
    for (method, seed), fid in P2_FID.items():
        key = next(k for k in RUNS if k[0] == method and k[3] == seed)
        info = _info("evaluate", jobs[key]["run_id"], bench_a, *key, [jobs[key]["sample"]], job_suffix="--p2")
        write_current(store, _finish(info, eval_info=eval_info(RUNS[key], P2, fid=fid)))
    # lora seed 2: the transfer ran out of memory; bitfit seed 1: sampling was cancelled (preempted).
    failed = _info("train", run_id_of("lora", "r4", bench_a, 2), bench_a, "lora", "peft", "r4", 2, [])
    store.write(_finish(failed, status="failed", error=RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")))
    bitfit1 = run_id_of("bitfit", "default", bench_a, 1)
    write_current(store, _finish(_info("train", bitfit1, bench_a, "bitfit", "peft", "default", 1, []),
                                 train_info=train_info(RUNS[("bitfit", "peft", "default", 0)], None)))
    store.write(_finish(_info("sample", bitfit1, bench_a, "bitfit", "peft", "default", 1, []), status="cancelled",
                        error="cancelled: SLURM preemption (SIGTERM)"))
    write_run(store, "novel-b--DiT-T-2", ("kind", "learngene", "default", 0), RUNS[("kind", "learngene", "default",
                                                                                      0)], None)
    return store


# ---- minimal records and worker processes for the store tests (this module stays light: spawned workers import it)

N_WRITERS = 50
PER_WRITER = 3
SIMPLE_PROTOCOL = P1


def simple_record(job_id: str, *, step: str = "evaluate", status: str = "success", blob: str = "",
                  fid: float = 21.5) -> dict:
    """A valid record; ``blob`` inflates the config (for big-file tests) and its sha256 is stored beside it."""
    config = {"method": {"name": "kind"}, "blob": blob, "blob_sha256": hashlib.sha256(blob.encode()).hexdigest()}
    info = new_run_info(job_id=job_id, run_id=job_id.rsplit("--", 1)[0], step=step, suite="tiny",
                        benchmark="novel-a--DiT-T-2", task="novel-a", arch="DiT-T/2", method="kind",
                        family="learngene", variant="default", seed=0, config=config, config_hash="3f9a1c2e", git=GIT)
    blocks = {}
    if status == "success" and step == "evaluate":
        blocks["eval_info"] = {"metrics": {"fid": metric(fid, False), "is": metric(5.1, True)},
                               "protocol": dict(SIMPLE_PROTOCOL)}
    return new_record(info, status=status, error=None if status == "success" else "RuntimeError: boom",
                      meta_info={"hostname": "node001", "pid": os.getpid()}, **blocks)


def concurrent_writer(root: str, worker: int, barrier, results) -> None:
    """One job process: wait until all writers are up, race everyone for one job id, then write its own records."""
    store = RecordStore(root)
    records = [simple_record(f"w{worker:02d}-r{k}--evaluate", fid=worker + k / 10) for k in range(PER_WRITER)]
    contested = simple_record("contested--evaluate", fid=float(worker))
    barrier.wait(120)
    try:  # first, while the barrier has just released everyone: the tightest race
        store.write(contested)
        results.put(("won", worker))
    except FileExistsError:
        results.put(("lost", worker))
    for record in records:
        store.write(record)


def racing_writer(root: str, role: str, job_ids: list[str], barrier) -> None:
    """A job and its retry racing: ``role`` "failed" writes a failure of every job id (a crashed attempt), "success"
    its success, both right after a shared barrier."""
    store = RecordStore(root)
    barrier.wait(120)
    for job_id in job_ids:
        try:
            store.write(simple_record(job_id, status="failed" if role == "failed" else "success"))
        except FileExistsError:
            pass  # the success was there first: a failure (or a second success) is refused


def big_writer(root: str, n: int, blob_mb: float, done) -> None:
    """Write ``n`` big records, and rewrite one job id with force each time, while a reader polls."""
    store = RecordStore(root)
    for k in range(n):
        blob = f"{k:04d}" * int(blob_mb * 2**18)
        store.write(simple_record(f"big{k:03d}--evaluate", blob=blob))
        store.write(simple_record("hot--evaluate", blob=blob, fid=float(k)), force=k > 0)  # rewritten in place
    done.set()


def check_complete(record: dict) -> None:
    """A torn or mixed file could parse by luck; the blob's checksum could not match too."""
    config = record["run_info"]["config"]
    assert hashlib.sha256(config["blob"].encode()).hexdigest() == config["blob_sha256"]
