"""Merged exports: a job's adapter (or one of its checkpoints) merged into its base model
loaded in 16-bit (merging into the 4-bit base it trained on loses quality: transformers
#31293, peft #2321), saved as safetensors with the tokenizer and chat template the job
trained with, and stored as one `.tar.gz` for `GET .../exports/{id}/content`."""

import logging
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from afina.core.archive import local_members, text_member, write_archive
from afina.core.ids import checkpoint_name
from afina.core.job_config import QuantizationSettings
from afina.core.model_card import model_card
from afina.core.model_loading import ModelLoadError, load_base_model, load_tokenizer
from afina.core.storage import export_key
from afina.jobs import exports
from afina.models import Job, JobExport
from afina.worker.heartbeat import Heartbeat
from afina.worker.job_runner import WorkerContext, fetch_adapter
from afina.worker.training.errors import TrainingFailure, first_line

logger = logging.getLogger(__name__)


def merge(base: str, adapter: Path, dtype: str, out: Path, *, trust_remote_code: bool) -> None:
    """Save `adapter` merged into `base` (loaded unquantized in `dtype`) to `out`, with the
    adapter's tokenizer (the base's, with afina's default chat template, for an adapter
    saved without one)."""
    quantization = QuantizationSettings(bits=None, compute_dtype=dtype)  # type: ignore[arg-type]
    model = load_base_model(base, quantization=quantization, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer_from = adapter if (adapter / "tokenizer_config.json").exists() else base
    load_tokenizer(str(tokenizer_from), trust_remote_code=trust_remote_code).save_pretrained(out)


def _claim(context: WorkerContext, export_id: str) -> tuple[JobExport, Job, str] | None:
    with context.session_factory.begin() as session:
        run_id = exports.claim(session, export_id)
        if run_id is None:
            return None
        export = session.get_one(JobExport, export_id)
        return export, session.get_one(Job, export.job_id), run_id


def _export(context: WorkerContext, export: JobExport, job: Job, workdir: Path, out: Path) -> None:
    """Merge the export and pack it into `out`."""
    step = export.checkpoint_step
    adapter = fetch_adapter(
        context, job.id, step, workdir / "adapter", "the adapter was deleted before it was merged"
    )
    merged = workdir / "merged"
    merge(
        job.model,
        adapter,
        export.dtype,
        merged,
        trust_remote_code=context.settings.trust_remote_code,
    )
    name = job.fine_tuned_model if step is None else checkpoint_name(job.id, step)
    card = model_card(
        name=name or job.id,
        job_id=job.id,
        base_model=job.model,
        config=job.config,  # a succeeded job's, stored resolved
        merged_dtype=export.dtype,
    )
    with out.open("wb") as archive:
        write_archive(archive, export.id, [*local_members(merged), text_member("README.md", card)])


def _as_failure(error: Exception) -> TrainingFailure:
    if isinstance(error, TrainingFailure):
        return error
    if isinstance(error, torch.OutOfMemoryError):
        return TrainingFailure(
            "out_of_memory",
            "the worker ran out of memory: merging loads the whole base model in 16-bit; "
            "run exports on a worker with more memory (AFINA_WORKER_QUEUES=export)",
        )
    if isinstance(error, ModelLoadError):
        return TrainingFailure("model_load_failed", str(error))
    return TrainingFailure(
        "export_error", f"merging stopped with {type(error).__name__}: {first_line(error)}"
    )


def run_export(context: WorkerContext, export_id: str) -> None:
    """Merge the export if it is still queued, and record how it ended."""
    claimed = _claim(context, export_id)
    if claimed is None:
        logger.info("export %s is not queued: skipped", export_id)
        return
    export, job, run_id = claimed
    workdir = context.settings.data_dir / "work" / export_id
    stored = export_key(job.id, export_id)
    heartbeat = Heartbeat(
        context.session_factory,
        lambda session: exports.heartbeat(session, export_id, run_id),
        export_id,
        context.settings.heartbeat_seconds,
    )
    staged = context.storage.staging_path(export_key(job.id))
    try:
        with heartbeat:
            _export(context, export, job, workdir, staged)
            size = staged.stat().st_size
            context.storage.publish(staged, stored)
            with context.session_factory.begin() as session:
                succeeded = exports.succeed(session, export_id, run_id, size)
            if not succeeded:  # failed meanwhile (its model deleted, its worker thought lost)
                context.storage.delete(stored)
    except Exception as error:
        logger.exception("export %s failed", export_id)
        context.storage.delete(stored)
        with context.session_factory.begin() as session:
            exports.fail(session, exports.holds(export_id, run_id), _as_failure(error).as_error())
    finally:
        staged.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
