"""Request and response bodies, shaped like OpenAI's objects."""
