"""One module per command; each holds an XJob dataclass (validated when built) and main(job)."""
