"""One router per resource: files, health (jobs, inference and models come next)."""
