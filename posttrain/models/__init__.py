"""Model loading and the tiny local models used by tests and quickstarts."""
