"""P-Former / BLIP-2 vision-language pre-training with a frozen LLM on Ray."""
