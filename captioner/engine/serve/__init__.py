"""`captioner serve`'s pieces: the dynamic batcher, the FastAPI app, its page and its limits."""
