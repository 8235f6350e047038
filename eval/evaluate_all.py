"""`clsp eval all`: one run end to end (scores, audit of its shards, contact sheet, report), every input checked
before the first file is written."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from clsp.errors import UserError
from clsp.sources import refuse_out_inside
from clsp.eval import write_new_set
from clsp.eval.evaluate import EvalConfig, prepare_eval, score_run
from clsp.eval.report import report


@dataclass(frozen=True)
class AllConfig:
    run_dir: str
    shards: str
    out: str
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit_anchors: int = 256


def evaluate_all(cfg: AllConfig) -> dict:
    """One run end to end: kNN + linear, audit of its shards, pictures, contact sheet, report (all under cfg.out).

    Every input (run, sources, shards) is read and checked, and the audit computed, before the first file is written."""
    from clsp.eval.audit import AuditConfig, audit_files, audit_shards
    from clsp.shards.manifest import read_manifest
    from clsp.shards.sheet import sheet_image

    out = Path(cfg.out)
    inputs = prepare_eval(cfg.run_dir, cfg.eval)
    for spec in {inputs.result["source"], inputs.result["test_source"]}:
        refuse_out_inside(spec, out)  # its pictures would become images of the source
    _check_trained_on_these(cfg, read_manifest(cfg.shards), inputs.result["trained_on"])
    audit = audit_shards(cfg.shards, inputs.result["source"], AuditConfig(cfg.audit_anchors),
                         *_loaded_splits(cfg, inputs))  # the splits prepare_eval holds: never two copies
    results = score_run(inputs, cfg.eval)
    png = io.BytesIO()
    sheet_image(cfg.shards).save(png, format="png")
    # one set, one number: audit-N.md and contact_sheet-N.png describe the same shards
    audit_json, audit_md, sheet = write_new_set({**audit_files(audit, out), out / "contact_sheet.png": png.getvalue()})
    (out / ".contact_sheet.tmp.png").unlink(missing_ok=True)  # the fixed-name temp that earlier versions' kills left
    summary = report([cfg.run_dir], out)
    return {**summary, "results": results, "audit": str(audit_json), "audit_md": str(audit_md), "sheet": str(sheet)}


def _loaded_splits(cfg: AllConfig, inputs) -> tuple[tuple | None, tuple | None]:
    """(train, test) of the audited source that prepare_eval holds already, else None: the train split when the bank
    is the whole train split (no unlabelled image left out), the test split when it is the source's own."""
    train = test = None
    if cfg.eval.train_split == "train" and "bank_unlabelled_left_out" not in inputs.result and inputs.train_ids:
        images, labels, fingerprint = inputs.train
        train = (images, labels, list(inputs.train_ids), fingerprint)
    if cfg.eval.test_source is None and cfg.eval.test_split == "test":
        test = inputs.test[:2]
    return train, test


def _check_trained_on_these(cfg: AllConfig, manifest, record: dict | None) -> None:
    """The audit and the contact sheet must show the positives the run trained on: refuse shards from another source
    or (by their bytes, as the run's config.json records them) any other shards."""
    from clsp.run_dir import read_record
    from clsp.train.loop import TRAIN_RUN, shards_sha256

    made_from, fix = manifest.run.get("source") or {}, "pass --shards the directory the run trained on"
    if record is not None and made_from.get("fingerprint") != record["fingerprint"]:
        raise UserError(f"{cfg.shards} were made from {made_from.get('spec')}[{made_from.get('split')}], but "
                        f"{cfg.run_dir} trained on shards made from {record.get('spec')}[{record.get('split')}] "
                        f"(other fingerprints): {fix}")
    trained = ((read_record(cfg.run_dir, TRAIN_RUN) or {}).get("data") or {}).get("shards_sha256")
    if trained is not None and trained != shards_sha256(manifest):  # None: a run from before clsp recorded it
        raise UserError(f"{cfg.shards} are not the shards {cfg.run_dir} trained on (same source, other shard bytes: "
                        f"another K, sampler, generator or seed, or made again): {fix}")
