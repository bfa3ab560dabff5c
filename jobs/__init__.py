"""The job lifecycle: every state change of a job as one conditional UPDATE plus its event
(`lifecycle`), the runs that hold a job (`run`), the training queue's messages (`queue`), the
retry policy of a run's writes (`retry`), and the reconciler that takes lost jobs back."""
