"""Shared diffusion parts: latents <-> images, prompt embeddings, the DDIM step, inversion."""
