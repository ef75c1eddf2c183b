"""Training- and finetuning-free methods (the survey's third learning strategy)."""
