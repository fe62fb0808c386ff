"""Demo-only code: the embedded default's generated data and tiny models. Product code never imports it."""
