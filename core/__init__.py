"""What the API and the worker both import: settings, storage, dataset validation, ids."""
