"""The `afina` command (`afina.cli.main:app`): the entry point, the one place allowed to import
the API, as `afina serve` runs it beside the embedded worker."""
