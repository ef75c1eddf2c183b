"""Test-time finetuning methods (the survey's second learning strategy)."""
