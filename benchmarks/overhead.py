"""editeval's wall time per edit divided by the bare diffusers pipeline's, on the same weights.

Both sides get the same image (already at the model's resolution), steps, guidance and seed, so the
ratio is the cost of editeval's wrapper: input preparation, NFE hook, result assembly. Runs are
interleaved and the median of each is taken. Goal: at most 1.05.

    python benchmarks/overhead.py [--model tiny] [--repeats 7] [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    from editeval import EditRequest, edit, load_pipeline
    from editeval.editing import model_resolution
    from editeval.diffusion.ddim import ddim_scheduler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    sd = load_pipeline(args.model)
    ip2p = load_pipeline(args.model, "instruction")
    side = model_resolution(sd)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    img2img = StableDiffusionImg2ImgPipeline(**{**sd.components, "scheduler": ddim_scheduler(sd)},
                                             requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    steps = args.steps

    cases = {
        "sdedit": (
            lambda: edit(EditRequest(image, target_prompt="a dog", seed=0,
                                     params={"num_inference_steps": steps}), "sdedit", pipe=sd),
            lambda: img2img(prompt="a dog", image=image, strength=0.5, num_inference_steps=steps,
                            guidance_scale=7.5, generator=torch.Generator().manual_seed(0)),
        ),
        "instructpix2pix": (
            lambda: edit(EditRequest(image, instruction="make it snow", seed=0,
                                     params={"num_inference_steps": steps}), "instructpix2pix",
                         pipe=ip2p),
            lambda: ip2p(prompt="make it snow", image=image, num_inference_steps=steps,
                         guidance_scale=7.5, image_guidance_scale=1.5,
                         generator=torch.Generator().manual_seed(0)),
        ),
    }
    print(f"model {args.model}, {side}px, {steps} steps, median of {args.repeats} interleaved runs")
    print(f"{'method':<16} {'editeval s':>11} {'diffusers s':>12} {'ratio':>7}")
    for name, (ours, bare) in cases.items():
        ours(), bare()  # warm-up
        ours_s, bare_s = [], []
        for _ in range(args.repeats):
            ours_s.append(seconds(ours))
            bare_s.append(seconds(bare))
        o, b = statistics.median(ours_s), statistics.median(bare_s)
        print(f"{name:<16} {o:>11.4f} {b:>12.4f} {o / b:>7.3f}")


if __name__ == "__main__":
    main()
