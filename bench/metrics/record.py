"""The evaluation record: one self-describing JSON per evaluation (docs/metrics.md §11, §13), written atomically.

Top-level keys (every one always present; a metric that was not computed is ``null`` with a reason in
``skipped``):

* metrics: ``fid, sfid, is, is_splits, is_std, precision, recall, fdd`` (+ ``clean_fid, kid`` when requested),
  ``metric_names`` carrying N (``FID-50K``), and ``metrics``: {name: {value, higher_is_better, label}} of the
  computed ones, the form the results store reads;
* ``n_samples``, ``n_ref_pr``, ``counts`` (exact P/R numerators), ``samples`` (path, sha256 or size);
* ``reference``: ``adm_npz_sha256``, ``adm_npz_path``, ``fdd_ref_sha256``, ``fdd_ref_n``, ``fdd_ref_provenance``;
* ``weights``: ``inception_sha256``, ``dinov2_sha256`` and per-file detail (official or not, pinned now or before);
* ``protocol``: ``inception_resize``, ``fdd_resize``, ``pos_embed``, ``pr_distance``, ``pr_k``, ``is_split_size``,
  ``is_shuffle_seed``, ``class_sampling``, ``fdd_arch``, ``frechet_method``;
* ``env``: torch, timm, numpy, scipy, cuda, device, ``tf32_disabled``, ``world_size``;
* ``diagnostics``: ``min_eig_sigma`` per space (samples and reference), ``min_eig_product``, ``n_vs_d_ok``,
  ``duplicates_found``, ``sample_npz_extra_keys``;
* ``created_at``, ``schema``.
"""

from __future__ import annotations

from bench.records.fields import check_utc_time, require_keys

SCHEMA = "kindbench.eval/1"
# What the metrics code guarantees, added to ``bench.records.environment.device_environment`` in the record's env.
ENV_GUARANTEES = {"tf32_disabled": True, "autocast": False}

REQUIRED_KEYS = ("schema", "created_at", "metrics", "fid", "sfid", "is", "is_splits", "precision", "recall", "fdd",
                 "metric_names", "n_samples", "n_ref_pr", "reference", "weights", "protocol", "env", "diagnostics")


def validate_eval_record(record: dict) -> None:
    """Raise ``ValueError`` naming the first problem if ``record`` does not follow schema ``kindbench.eval/1``."""
    require_keys(record, REQUIRED_KEYS, "evaluation record")
    check_utc_time(record["created_at"], "evaluation record created_at")
    require_keys(record["reference"], ("adm_npz_sha256", "fdd_ref_sha256", "fdd_ref_n"), "evaluation record reference")
    require_keys(record["protocol"], ("inception_resize", "fdd_resize", "pos_embed", "pr_distance", "is_split_size",
                                      "is_shuffle_seed", "class_sampling"), "evaluation record protocol")
    require_keys(record["diagnostics"], ("min_eig_sigma", "n_vs_d_ok", "duplicates_found"),
                 "evaluation record diagnostics")
