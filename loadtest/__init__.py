"""Load generation and benchmarks against OpenAI-compatible endpoints and the engine."""
