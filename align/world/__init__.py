"""A deterministic toy world that produces data for every stage of the pipeline (demo and tests)."""
