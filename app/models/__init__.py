"""Model building blocks: P-Former, frozen LLM, and the composites each stage trains."""
