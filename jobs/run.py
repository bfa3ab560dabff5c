"""One run of a job: what it writes lands only while the job is `running` under its run id.

A run whose job was taken back (its worker was thought lost, then came back: a frozen process,
a lost database connection) or cancelled writes nothing more and stops at its next step."""

from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_

from afina.models import Job, JobStatus


@dataclass(frozen=True)
class Run:
    job_id: str
    run_id: str

    def holds(self) -> ColumnElement[bool]:
        """The job is running, under this run."""
        return and_(
            Job.id == self.job_id, Job.status == JobStatus.RUNNING, Job.run_id == self.run_id
        )
