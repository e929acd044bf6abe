"""The records store: one immutable JSON record per step job, written atomically on a shared filesystem.

Layout under the store root (docs/harness.md §3.1-3.2; the schema is the TypedDicts below)::

    <root>/records/<job_id>.json      status "success"
    <root>/failed/<job_id>.json       status "failed" or "cancelled"
    <root>/superseded/<job_id>.<utc>.<tag>.json   records replaced by a forced rewrite or a retry

Rules:

* A record is never edited. Writing a job id whose success record exists is a ``FileExistsError`` unless
  ``force=True``; the old record is then kept under ``superseded/``.
* A failed/cancelled record never blocks a retry: the next write for that job id (success or failure) moves it to
  ``superseded/``, so ``failed/`` holds only the latest failure of jobs that have not succeeded since.
* Writes are atomic and durable: the JSON goes to a uniquely named hidden temp file in the target folder, is
  fsync'ed, then published with ``os.link`` (which fails if the name exists, so two jobs racing on one id cannot
  both win) or ``os.replace`` (forced rewrite). Readers see the old record, the new one, or none; never half a file.
* Paths inside records (``loss_curve``, ``grid_png``, ``npz``) are relative to the store root unless absolute.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict

from bench.records.fields import check_utc_time, parse_utc, require_keys, utc_now

SCHEMA_VERSION = 1
STATUSES = ("success", "failed", "cancelled")
STEPS = ("prepare", "pretrain", "train", "sample", "evaluate", "aggregate")

# One path component that is safe on every filesystem we meet (no "/", no leading dot, no "..").
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")


# --------------------------------------------------------------------------------------------------------------------
# Schema (lm-eval result_schema style: one comment per key)
# --------------------------------------------------------------------------------------------------------------------


class AncestryRef(TypedDict):
    job_id: str  # the ancestry job whose checkpoint this run starts from
    path: str  # checkpoint path (relative to the store root unless absolute)
    sha256: str  # sha256 of that checkpoint file, so a swapped checkpoint is detectable


class RunInfo(TypedDict):
    job_id: str  # unique id of this step job; the file name is <job_id>.json
    run_id: str  # readable prefix + config hash; every step job of one run shares it
    step: str  # one of STEPS
    suite: str  # suite the job was planned from ("tiny", ...)
    benchmark: str  # task x model size; one leaderboard per benchmark ("novel-a--DiT-T-2"); "" for suite-level jobs
    task: str  # downstream task ("novel-a")
    arch: str  # DiT display name ("DiT-T/2")
    method: str  # registry key of the method ("kind", "lora", ...)
    family: str  # pretrain | full_ft | peft | learngene | ...
    variant: str  # experiment name within the method ("default", "r4")
    seed: int  # the run's seed; leaderboards aggregate over it
    config: dict[str, Any]  # the resolved config (single source of truth)
    config_hash: str  # hash of ``config``; the suffix of run_id
    created_at: str  # ISO-8601 UTC, when the job started
    finished_at: str  # ISO-8601 UTC, when the record was made
    git_sha: str | None  # commit the code ran from (None outside a checkout)
    git_dirty: bool | None  # uncommitted changes to tracked files
    ancestry: AncestryRef | None  # what the run inherits from, or None
    depends_on: list[str]  # job ids this job consumed (the plan's edges)


class Accounting(TypedDict):
    params_total: int  # every parameter of the model as trained
    params_trainable: int  # parameters with requires_grad during training
    params_inherited: int  # parameters taken from the ancestry
    params_new: int  # parameters created by the method (adapters, gates, new heads)
    stored_bytes: int  # bytes of what the method must store on top of its ancestry
    gmacs_fwd_trained: float  # forward GMACs per image of the model as trained (DiT convention)
    gmacs_fwd_sampled: float  # forward GMACs per image of ``sampling_model`` (what sampling costs)


class TrainInfo(TypedDict):
    steps: int  # optimizer steps taken
    images_seen: int  # steps x global batch
    global_batch: int  # images per optimizer step over all ranks
    world_size: int  # ranks that trained
    wall_s: float  # wall-clock seconds of the training loop
    gpu_hours: float  # wall_s x GPUs / 3600 (0 on CPU)
    peak_mem_gb: float  # peak accelerator memory of rank 0
    final_loss: float | None  # last logged all-reduced loss
    loss_curve: str | None  # train.jsonl path (relative to the store root unless absolute)
    accounting: Accounting  # params and GMACs, from ``Method.count``
    train_gmacs_total: float  # gmacs_fwd_trained x 3 x images_seen (DiT's fwd+bwd convention)


class SampleInfo(TypedDict):
    npz: str  # ADM-style .npz of samples (arr_0 uint8 NHWC)
    npz_sha256: str  # checksum of the npz
    num_samples: int  # images in the npz
    scheduler: str  # sampler ("ddpm", "ddim", ...)
    num_steps: int  # sampling steps
    cfg_scale: float  # classifier-free guidance scale (1.0 = none)
    label_mode: str  # how class labels were drawn ("uniform", "balanced")
    seed: int  # sampling seed
    grid_png: str | None  # preview grid PNG (relative to the store root unless absolute)
    clip_denoised: bool  # predicted x_0 clipped to [-1, 1] at every step (pixel space)


class MetricValue(TypedDict):
    value: float | None  # the metric, or None when it could not be computed
    higher_is_better: bool  # direction, from the metric registry; drives sorting, arrows and Pareto fronts


class EvalProtocol(TypedDict):
    n_samples: int  # generated images scored
    extractor: str  # feature extractor name ("inception-v3-tf", "kindbench-synthetic-v1", ...)
    extractor_sha256: str  # checksum of the extractor weights
    reference_id: str  # reference statistics id
    reference_sha256: str  # checksum of the reference statistics
    cfg_scale: float  # guidance scale of the scored samples
    sampler: str  # sampler of the scored samples
    num_steps: int  # sampling steps of the scored samples
    clip_denoised: bool  # whether the scored samples clipped x_0 at every step


class EvalInfo(TypedDict):
    metrics: dict[str, MetricValue]  # "fid", "sfid", "is", "precision", "recall", "fdd", ...
    protocol: EvalProtocol  # rows are ranked together only if their protocols are equal
    # optional (embedded protocol): sample_intervals {metric: [low, high], method, level} (bootstrap over samples)
    # and class_acc_real (the domain classifier's accuracy on the reference's real images)


class Record(TypedDict, total=False):
    schema_version: int  # SCHEMA_VERSION; bumped on any breaking change
    run_info: RunInfo  # identity, config and provenance of the job
    status: Literal["success", "failed", "cancelled"]  # decides the folder the record goes to
    error: str | None  # one-line message when status is not success, else None
    train_info: TrainInfo  # ancestry/transfer jobs
    sample_info: SampleInfo  # sample jobs
    eval_info: EvalInfo  # evaluate jobs
    timings: dict[str, float]  # {"step_wall_s": ...}
    meta_info: dict[str, Any]  # environment: hostname, python, packages, cuda, gpu, world size, SLURM ids, git
    extra: dict[str, Any]  # step-specific payload without a block of its own (prepare: reference; aggregate: files)
    outputs: dict[str, OutputRef]  # files the job produced that later jobs read (bench.pipeline.status checks them)


class OutputRef(TypedDict):
    path: str  # relative to the runs root unless absolute
    sha256: str  # the file as the job wrote it; a different or missing file makes the record untrusted


# Written by bench.pipeline.jobs into run_info beside the required keys (optional for records of older versions):
#   code: {"fingerprint": str, "modules": str}  hash of the source the job's step and method ran
#                                               (bench.records.fingerprint)
#   inputs: {job_id: digest}                    digest of every record the job consumed
#                                               (bench.records.currency.record_digest)
#   protocol_settings: dict                     the sample job's SampleConfig / the evaluate job's EvalConfig


REQUIRED = {
    "record": ("schema_version", "run_info", "status", "error", "timings", "meta_info"),
    "run_info": tuple(RunInfo.__annotations__),
    "train_info": tuple(TrainInfo.__annotations__),
    "accounting": tuple(Accounting.__annotations__),
    "sample_info": tuple(SampleInfo.__annotations__),
    "eval_info": tuple(EvalInfo.__annotations__),
    "protocol": tuple(EvalProtocol.__annotations__),
}
# A successful job of these steps must carry its step's block; failed jobs may die before they have one.
_STEP_BLOCK = {"pretrain": "train_info", "train": "train_info", "sample": "sample_info", "evaluate": "eval_info"}


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


class MalformedRecordError(ValueError):
    """A record file that cannot be parsed or does not follow the schema; the message names the file."""


def is_safe_job_id(job_id: object) -> bool:
    return isinstance(job_id, str) and bool(_SAFE_ID.match(job_id)) and ".." not in job_id


def validate_job_record(record: Any) -> None:
    """Raise ``ValueError`` naming the first problem if ``record`` does not follow schema version 1."""
    require_keys(record, REQUIRED["record"], "record")
    if record["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"record schema_version is {record['schema_version']!r}; this code reads {SCHEMA_VERSION}")
    status = record["status"]
    if status not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, got {status!r}")
    if status == "success" and record["error"] is not None:
        raise ValueError("a successful record must have error=None")
    if status != "success" and not (isinstance(record["error"], str) and record["error"].strip()):
        raise ValueError(f"a {status} record needs a one-line error message")
    info = record["run_info"]
    require_keys(info, REQUIRED["run_info"], "run_info")
    if not is_safe_job_id(info["job_id"]):
        raise ValueError(f"run_info.job_id {info['job_id']!r} is not safe as a file name "
                         "(letters, digits and ._=+- only, no leading dot, no '..', at most 200 characters)")
    if info["step"] not in STEPS:
        raise ValueError(f"run_info.step must be one of {STEPS}, got {info['step']!r}")
    if not isinstance(info["seed"], int) or isinstance(info["seed"], bool):
        raise ValueError(f"run_info.seed must be an integer, got {info['seed']!r}")
    if not isinstance(info["depends_on"], list) or not all(isinstance(j, str) for j in info["depends_on"]):
        raise ValueError("run_info.depends_on must be a list of job ids")
    if not isinstance(info["config"], dict):
        raise ValueError("run_info.config must be an object (the resolved config)")
    outputs = record.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise ValueError("outputs must be an object: name -> {path, sha256}")
        for name, ref in outputs.items():
            require_keys(ref, ("path", "sha256"), f"outputs.{name}")
    for key in ("created_at", "finished_at"):
        check_utc_time(info[key], f"record run_info.{key}")
    for name in ("timings", "meta_info"):
        if not isinstance(record[name], dict):
            raise ValueError(f"record {name} must be an object")
    block = _STEP_BLOCK.get(info["step"])
    if status == "success" and block is not None and block not in record:
        raise ValueError(f"a successful {info['step']} record needs {block}")
    _validate_blocks(record)


def _validate_blocks(record: dict) -> None:
    if "train_info" in record:
        require_keys(record["train_info"], REQUIRED["train_info"], "train_info")
        require_keys(record["train_info"]["accounting"], REQUIRED["accounting"], "train_info.accounting")
    if "sample_info" in record:
        require_keys(record["sample_info"], REQUIRED["sample_info"], "sample_info")
    if "eval_info" in record:
        require_keys(record["eval_info"], REQUIRED["eval_info"], "eval_info")
        require_keys(record["eval_info"]["protocol"], REQUIRED["protocol"], "eval_info.protocol")
        require_keys(record["eval_info"]["metrics"], (), "eval_info.metrics")
        for name, metric in record["eval_info"]["metrics"].items():
            if not isinstance(metric, dict) or "value" not in metric or "higher_is_better" not in metric:
                raise ValueError(f"eval_info.metrics.{name} must be {{'value': ..., 'higher_is_better': ...}}")
            if not isinstance(metric["higher_is_better"], bool):
                raise ValueError(f"eval_info.metrics.{name}.higher_is_better must be true or false")
            value = metric["value"]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"eval_info.metrics.{name}.value must be a finite number or null, got {value!r}")


# --------------------------------------------------------------------------------------------------------------------
# Builders for the common parts
# --------------------------------------------------------------------------------------------------------------------


def one_line(error: BaseException | str) -> str:
    """A one-line error message for a record: ``"RuntimeError: CUDA out of memory"``."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    text = " ".join(text.split())
    return (text or "unknown error")[:1000]


def new_run_info(*, job_id: str, run_id: str, step: str, suite: str, benchmark: str, task: str, arch: str,
                 method: str, family: str, variant: str, seed: int, config: dict[str, Any], config_hash: str,
                 ancestry: AncestryRef | None = None, depends_on: Sequence[str] = (),
                 git: Mapping[str, Any] | None = None, created_at: str | None = None) -> RunInfo:
    """The ``run_info`` block, stamped ``created_at`` now. ``git`` defaults to
    ``bench.records.environment.git_state()``.

    ``finished_at`` is filled by ``new_record``.
    """
    if git is None:
        from bench.records.environment import git_state  # lazy: provenance imports torch

        git = git_state()
    if not is_safe_job_id(job_id):
        raise ValueError(f"job_id {job_id!r} is not safe as a file name")
    return RunInfo(job_id=job_id, run_id=run_id, step=step, suite=suite, benchmark=benchmark, task=task, arch=arch,
                   method=method, family=family, variant=variant, seed=seed, config=config, config_hash=config_hash,
                   created_at=created_at or utc_now(), finished_at="", git_sha=git.get("git_sha"),
                   git_dirty=git.get("git_dirty"), ancestry=ancestry, depends_on=list(depends_on))


def new_record(run_info: RunInfo, *, status: str = "success", error: BaseException | str | None = None,
               train_info: TrainInfo | None = None, sample_info: SampleInfo | None = None,
               eval_info: EvalInfo | None = None, timings: dict[str, float] | None = None,
               meta_info: dict[str, Any] | None = None, finished_at: str | None = None,
               extra: dict[str, Any] | None = None) -> Record:
    """A complete record around ``run_info``: ``finished_at`` now, ``timings.step_wall_s`` from the two stamps
    unless given, ``meta_info`` from ``bench.records.environment.environment()`` unless given.
    Validated before return."""
    if meta_info is None:
        from bench.records.environment import environment  # lazy: provenance imports torch

        meta_info = environment()
    info = RunInfo(**{**run_info, "finished_at": finished_at or utc_now()})
    if timings is None:
        start, end = parse_utc(info["created_at"]), parse_utc(info["finished_at"])
        timings = {"step_wall_s": max((end - start).total_seconds(), 0.0)}
    record = Record(schema_version=SCHEMA_VERSION, run_info=info, status=status,  # type: ignore[typeddict-item]
                    error=None if error is None else one_line(error), timings=timings, meta_info=meta_info)
    for name, block in (("train_info", train_info), ("sample_info", sample_info), ("eval_info", eval_info),
                        ("extra", extra)):
        if block is not None:
            record[name] = block  # type: ignore[literal-required]
    validate_job_record(record)
    return record


def metric(value: float | None, higher_is_better: bool) -> MetricValue:
    """One ``eval_info.metrics`` entry; ``None`` for a metric that could not be computed."""
    return MetricValue(value=None if value is None else float(value), higher_is_better=higher_is_better)


# --------------------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------------------

OnError = Callable[[Path, Exception], None]
# Filesystems without hard links (some FUSE/object-store mounts) answer link() with one of these.
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


class RecordStore:
    """Records of one results tree (``results/`` for committed suites). Safe for many writers on a shared FS."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.success_dir = self.root / "records"
        self.failed_dir = self.root / "failed"
        self.superseded_dir = self.root / "superseded"

    def __repr__(self) -> str:
        return f"RecordStore({str(self.root)!r})"

    # ---- paths -------------------------------------------------------------------------------------------------

    def path(self, job_id: str, status: str = "success") -> Path:
        if not is_safe_job_id(job_id):
            raise ValueError(f"job_id {job_id!r} is not safe as a file name")
        folder = self.success_dir if status == "success" else self.failed_dir
        return folder / f"{job_id}.json"

    # ---- writing -----------------------------------------------------------------------------------------------

    def write(self, record: Record | dict, force: bool = False) -> Path:
        """Validate and publish ``record``; return its path.

        ``FileExistsError`` if a success record of that job id exists (also when another process won a race for
        it) unless ``force``; the replaced record then moves to ``superseded/``. A previous failure of the job
        always moves to ``superseded/``.
        """
        try:
            validate_job_record(record)
            payload = json.dumps(record, indent=2, allow_nan=False) + "\n"  # NaN/inf anywhere is invalid JSON
        except (ValueError, TypeError) as exc:  # TypeError: a value json cannot encode (a Path, a tensor)
            info = record.get("run_info") if isinstance(record, dict) else None
            job = info.get("job_id", "?") if isinstance(info, dict) else "?"
            raise ValueError(f"cannot write record {job!r}: {exc}") from None
        job_id = record["run_info"]["job_id"]
        target = self.path(job_id, record["status"])
        done = self.path(job_id, "success")
        if done.exists() and not force:
            raise FileExistsError(f"record already exists: {done} (records are immutable; use force=True to rewrite)")
        tmp = self._write_temp(target.parent, job_id, payload)
        try:
            if force and target.exists():
                self._keep_superseded(target, job_id, "forced", copy=True)
                os.replace(tmp, target)  # atomic swap: readers see the old or the new record
            else:
                self._publish_new(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(target.parent)
        self._retire_others(job_id, target, force)
        return target

    def _write_temp(self, folder: Path, job_id: str, payload: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        # Unique per process and call (pid + uuid4); the leading dot keeps it out of every *.json listing.
        tmp = folder / f".{job_id}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as a plain open would
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _publish_new(self, tmp: Path, target: Path) -> None:
        try:
            os.link(tmp, target)  # fails with EEXIST if anyone published this name first: no silent overwrite
        except FileExistsError:
            if target.parent == self.failed_dir:  # an earlier failure never blocks a retry; keep it for history
                self._keep_superseded(target, target.stem, "retried", copy=True)
                os.replace(tmp, target)
                return
            raise FileExistsError(f"record already exists: {target} (written concurrently by another job)") from None
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            if target.exists() and target.parent == self.success_dir:  # no hard links: check, then replace
                raise FileExistsError(f"record already exists: {target}") from None
            os.replace(tmp, target)

    def _keep_superseded(self, path: Path, job_id: str, why: str, *, copy: bool) -> None:
        self.superseded_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self.superseded_dir / f"{job_id}.{stamp}.{why}.{uuid.uuid4().hex[:8]}.json"
        try:
            if copy:  # a hard link keeps the old record in place until the atomic swap replaces it
                os.link(path, dest)
            else:
                os.replace(path, dest)
        except FileNotFoundError:
            return  # another writer retired it first
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            dest.write_bytes(path.read_bytes())
            if not copy:
                path.unlink(missing_ok=True)

    def _retire_others(self, job_id: str, written: Path, force: bool) -> None:
        """After a write, the job id lives in one folder only: a stale failure (or a forced-over success) moves.

        A failure published while a concurrent writer published the job's success (each checked before the other
        wrote) moves too: whichever of the two writers looks last sees both and retires the failure."""
        if not force and written.parent == self.failed_dir and self.path(job_id, "success").exists():
            self._keep_superseded(written, job_id, "retried", copy=False)
            return
        for status in ("failed", "success"):
            other = self.path(job_id, status)
            if other == written or not other.exists():
                continue
            if status == "success" and not force:
                continue  # unreachable in practice: write() refused earlier
            self._keep_superseded(other, job_id, "forced" if status == "success" else "retried", copy=False)

    # ---- reading -----------------------------------------------------------------------------------------------

    def read(self, job_id: str) -> Record | None:
        """The success record of ``job_id``, or None. ``MalformedRecordError`` (naming the file) if it is broken."""
        return self._read_if_present(self.path(job_id, "success"))

    def failed(self, job_id: str) -> Record | None:
        """The latest failed/cancelled record of ``job_id`` (not superseded by a later success), or None."""
        return self._read_if_present(self.path(job_id, "failed"))

    def exists(self, job_id: str) -> bool:
        """True if ``job_id`` finished successfully: the pipeline's "already done, skip it" test."""
        return self.path(job_id, "success").exists()

    def iter(self, status: str = "success", *, on_error: OnError | None = None) -> Iterator[Record]:
        """Records in file-name order: ``status`` is "success", "failed" (failed and cancelled) or "all".

        A broken file raises ``MalformedRecordError`` naming it, unless ``on_error(path, exc)`` is given, in which
        case it is reported there and skipped.
        """
        folders = {"success": [self.success_dir], "failed": [self.failed_dir],
                   "all": [self.success_dir, self.failed_dir]}
        if status not in folders:
            raise ValueError(f"status must be 'success', 'failed' or 'all', got {status!r}")
        for folder in folders[status]:
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                try:
                    record = load_record(path)
                except MalformedRecordError as exc:
                    if on_error is None:
                        raise
                    on_error(path, exc)
                    continue
                except FileNotFoundError:
                    continue  # moved to superseded/ between listing and reading
                yield record

    def _read_if_present(self, path: Path) -> Record | None:
        try:
            return load_record(path)
        except FileNotFoundError:
            return None


def load_record(path: str | os.PathLike) -> Record:
    """Read and validate one record file; ``MalformedRecordError`` names the file and the problem."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        validate_job_record(record)
    except ValueError as exc:
        raise MalformedRecordError(f"malformed record {path}: {exc}") from None
    if record["run_info"]["job_id"] != path.stem:
        raise MalformedRecordError(f"malformed record {path}: its job_id is {record['run_info']['job_id']!r}, "
                                   f"not the file name {path.stem!r}")
    expected = "records" if record["status"] == "success" else "failed"
    if path.parent.name in ("records", "failed") and path.parent.name != expected:
        raise MalformedRecordError(f"malformed record {path}: status {record['status']!r} belongs in {expected}/")
    return record


def _fsync_dir(folder: Path) -> None:
    """Make the new directory entry durable; some filesystems (and all of Windows) cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
