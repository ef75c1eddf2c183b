"""Training-based methods (the survey's first learning strategy)."""
