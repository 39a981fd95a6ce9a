"""pytest plugin entry point (filled in by the core work)."""
