"""The one training loop every stage runs, its optimiser/schedule, checkpoints and launcher."""
