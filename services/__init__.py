"""The composition root: what one process builds once and closes once (`root.Services`)."""
