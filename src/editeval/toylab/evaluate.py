"""Quality of the toy models, measured by the oracle against ground truth.

    python -m editeval.toylab.evaluate --model toy --samples 200     # prints a Markdown table

Measures (the bars of the toy-world issue in brackets):
- VAE reconstruction PSNR on random scenes [>= 28 dB], and the share of object shapes the oracle
  reads back from those reconstructions (no bar: the most text-to-image can reach on these latents);
- DDIM inversion then reconstruction, 50 steps, guidance 1, PSNR against the scene [>= 25 dB];
- text-to-image, 50 DDIM steps, guidance 7.5: share of objects whose shape and colour the oracle
  reads as the caption says (matched by slot) and of backgrounds [each >= 90%], and a second
  table of what each shape was read as;
- toy InstructPix2Pix on ``editeval-toy``: oracle edit success averaged over the 7 tasks [>= 70%]
  and PSNR of the unedited region against the ground-truth target [>= 25 dB];
- toy CLIP (no bar): how often its CLIPScore prefers a scene's caption to the caption with one
  object's colour, size, texture or shape changed (a hard negative);
- toy Stable Diffusion inpainting (``sd-inpainting``, 50 steps, guidance 7.5): one object of each
  scene masked as the toy pairs mask objects, inpainted from the scene's caption: share of
  objects the oracle reads back with the caption's shape and colour [>= 80%], and PSNR of the
  unmasked region against the scene [within 1 dB of the VAE round trip's there];
- outpainting (no bar): each scene's centre (its 8 px border cut off) outpainted back to 64 px
  from its caption: the source pixels kept exactly, the background read right, and the objects
  that cross the border read with their shape and colour.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import torch
from PIL import Image

from editeval.toyworld.oracle import parse, psnr
from editeval.toyworld.pairs import _objects_mask
from editeval.toyworld.scenes import (
    ATTRIBUTE_PHRASES,
    coverage,
    hard_negative,
    render,
    sample_scene,
)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def _vae_round_trip(pipe: Any, image: np.ndarray) -> np.ndarray:
    """VAE encode (posterior mean) then decode of a uint8 RGB image."""
    from editeval.diffusion.latents import decode_latents, encode_image

    return np.asarray(decode_latents(pipe, encode_image(pipe, Image.fromarray(image))))


def vae_psnr(pipe: Any, scenes: list) -> float:
    """Mean PSNR (dB) of VAE encode (posterior mean) then decode."""
    images = [render(scene) for scene in scenes]
    return float(np.mean([psnr(_vae_round_trip(pipe, image), image) for image in images]))


def vae_shape_accuracy(pipe: Any, scenes: list) -> float:
    """Share (0..1) of objects whose shape the oracle reads back, by slot, from the VAE's encode
    (posterior mean) then decode of the clean render: the ceiling of text-to-image shape accuracy
    for samplers that produce the encoder's latents."""
    seen = [parse(_vae_round_trip(pipe, render(scene))) for scene in scenes]
    return generation_accuracy(scenes, seen)["shape"]


def inversion_psnr(pipe: Any, scenes: list, steps: int = 50, guidance_scale: float = 1.0) -> float:
    """Mean PSNR (dB) of DDIM inversion under the scene's caption, then sampling back."""
    from editeval.diffusion.ddim import reconstruct

    values = []
    for scene in scenes:
        image = render(scene)
        result = reconstruct(pipe, Image.fromarray(image), scene.caption(), steps, guidance_scale)
        values.append(psnr(np.asarray(result.image), image))
    return float(np.mean(values))


@torch.no_grad()
def text_to_image_samples(pipe: Any, scenes: list, steps: int = 50, guidance_scale: float = 7.5,
                          seed: int = 0, batch: int = 50) -> list[np.ndarray]:
    """One DDIM sample per scene's caption: uint8 RGB arrays (H, W, 3), generator seeded once."""
    from editeval.diffusion.ddim import ddim_scheduler

    generator = torch.Generator().manual_seed(seed)
    sampler = type(pipe)(**{**pipe.components, "scheduler": ddim_scheduler(pipe)})
    sampler.set_progress_bar_config(disable=True)
    images = []
    for chunk in _batches(scenes, batch):
        out = sampler([s.caption() for s in chunk], num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=generator, output_type="np").images
        images += [(image * 255).round().astype(np.uint8) for image in out]
    return images


def generation_accuracy(scenes: list, seen: list) -> dict[str, float]:
    """Share (0..1) of the ``scenes``' objects whose shape / colour the oracle's readings ``seen``
    (one parsed scene each) give in the same slot, and of scenes whose background they give."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for scene, read in zip(scenes, seen, strict=True):
        hits["background"].append(read.background == scene.background)
        for obj in scene.objects:
            found = read.objects.get(obj.slot)
            hits["shape"].append(found is not None and found.shape == obj.shape)
            hits["colour"].append(found is not None and found.colour == obj.colour)
    return {key: float(np.mean(values)) for key, values in hits.items()}


def shape_confusion(scenes: list, seen: list) -> dict[str, Counter]:
    """For each shape the scenes ask for, how often the readings ``seen`` give each shape in its
    slot (``None``: no object read there)."""
    confusion: dict[str, Counter] = defaultdict(Counter)
    for scene, read in zip(scenes, seen, strict=True):
        for obj in scene.objects:
            found = read.objects.get(obj.slot)
            confusion[obj.shape][found.shape if found is not None else None] += 1
    return dict(confusion)


def text_to_image_accuracy(pipe: Any, scenes: list, steps: int = 50,
                           guidance_scale: float = 7.5) -> dict[str, float]:
    """:func:`generation_accuracy` of :func:`text_to_image_samples` of the scenes' captions."""
    images = text_to_image_samples(pipe, scenes, steps, guidance_scale)
    return generation_accuracy(scenes, [parse(image) for image in images])


def instruction_edit_quality(pipe: Any, samples: list, steps: int = 50) -> dict[str, Any]:
    """InstructPix2Pix on toy samples: oracle success per task and unedited-region PSNR (dB)
    against the ground-truth target."""
    from editeval.core import EditRequest
    from editeval.editing import edit
    from editeval.toyworld.dataset import judge_sample

    success: dict[str, list[bool]] = defaultdict(list)
    unedited: list[float] = []
    for sample in samples:
        result = edit(EditRequest(sample.image_path, instruction=sample.instruction,
                                  params={"num_inference_steps": steps}),
                      "instructpix2pix", pipe=pipe)
        judged = judge_sample(sample, result.image)
        success[sample.task].append(judged.score.success)
        if np.isfinite(judged.unedited_psnr_vs_target):
            unedited.append(judged.unedited_psnr_vs_target)
    per_task = {task: float(np.mean(v)) for task, v in success.items()}
    return {"success_per_task": per_task, "success": float(np.mean(list(per_task.values()))),
            "unedited_psnr": float(np.mean(unedited))}


def _same_object(read: Any, obj: Any) -> bool:
    """The oracle's reading ``read`` (or None) has ``obj``'s shape and colour."""
    return read is not None and (read.shape, read.colour) == (obj.shape, obj.colour)


def inpainting_quality(pipe: Any, scenes: list, steps: int = 50, seed: int = 0) -> dict[str, float]:
    """The ``sd-inpainting`` method on one object of each scene (drawn with ``seed``), masked as
    the toy pairs mask objects (its footprint grown by 2 px), from the scene's caption.

    Returns shares (0..1) of the masked objects that the oracle reads back in their slot with the
    caption's shape and colour (``restored``) and with every attribute (``all_attributes``), and
    the mean PSNR (dB) of the unmasked region against the scene, of the inpainting
    (``unmasked_psnr``) and of the VAE's round trip (``vae_unmasked_psnr``).
    """
    from editeval.core import EditRequest
    from editeval.editing import edit

    rng = np.random.default_rng(seed)
    hits: dict[str, list] = defaultdict(list)
    for index, scene in enumerate(scenes):
        obj = scene.objects[int(rng.integers(0, len(scene.objects)))]
        image, mask = render(scene), _objects_mask([obj], 64)
        result = edit(EditRequest(Image.fromarray(image), target_prompt=scene.caption(),
                                  mask=Image.fromarray(mask.astype(np.uint8) * 255), seed=index,
                                  params={"num_inference_steps": steps}),
                      "sd-inpainting", pipe=pipe)
        out = np.asarray(result.image)
        read = parse(out).objects.get(obj.slot)
        hits["restored"].append(_same_object(read, obj))
        hits["all_attributes"].append(read is not None and all(
            getattr(read, key) == getattr(obj, key)
            for key in ("shape", "colour", "texture", "size", "pose")))
        hits["unmasked_psnr"].append(psnr(out, image, ~mask))
        hits["vae_unmasked_psnr"].append(psnr(_vae_round_trip(pipe, image), image, ~mask))
    return {key: float(np.mean(values)) for key, values in hits.items()}


def outpainting_quality(pipe: Any, scenes: list, border: int = 8,
                        steps: int = 50) -> dict[str, float]:
    """The ``outpainting`` method on each scene's centre (the 64 px render without its
    ``border``), extended by ``border`` px on every side from the scene's caption.

    Returns shares (0..1): of results that hold the centre's pixels exactly (``kept``), whose
    background the oracle reads right (``background``), and of the objects crossing the border
    (some of their footprint cut off) that it reads in their slot with their shape and colour
    (``crossing_objects``; the count in ``crossing_count``).
    """
    from editeval.core import EditRequest
    from editeval.editing import edit

    inside = np.zeros((64, 64), dtype=bool)
    inside[border:-border, border:-border] = True
    hits: dict[str, list] = defaultdict(list)
    for index, scene in enumerate(scenes):
        centre = render(scene)[border:-border, border:-border]
        result = edit(EditRequest(Image.fromarray(centre), target_prompt=scene.caption(),
                                  seed=index, params={"amount": float(border), "unit": "px",
                                                      "num_inference_steps": steps}),
                      "outpainting", pipe=pipe)
        out = np.asarray(result.image)
        hits["kept"].append(np.array_equal(out[inside].reshape(centre.shape), centre))
        read = parse(out)
        hits["background"].append(read.background == scene.background)
        for obj in scene.objects:
            if (coverage(obj, 64)[~inside] > 0).any():
                hits["crossing_objects"].append(_same_object(read.objects.get(obj.slot), obj))
    quality = {key: float(np.mean(values)) for key, values in hits.items()}
    return {**quality, "crossing_count": len(hits["crossing_objects"])}


def clip_attribute_accuracy(clip: Any, scenes: list, seed: int = 0) -> dict[str, float]:
    """Per attribute, the share of scenes whose CLIPScore with their caption is above that with
    the caption with one object's ``attribute`` changed (scenes lacking it, e.g. a texture when
    every object is plain, are left out). ``clip``: a :func:`editeval.metrics.load_clip` backbone.
    """
    from editeval.metrics.clip_similarity import clip_score

    rng = np.random.default_rng(seed)
    images = [render(scene) for scene in scenes]
    right = clip_score(clip, images, [scene.caption() for scene in scenes])
    accuracy = {}
    for attribute in ATTRIBUTE_PHRASES:
        kept, negatives = [], []
        for i, scene in enumerate(scenes):
            try:
                negatives.append(hard_negative(scene.caption(), rng, attribute))
                kept.append(i)
            except ValueError:
                continue
        wrong = clip_score(clip, [images[i] for i in kept], negatives)
        accuracy[attribute] = float(np.mean(right[kept] > wrong))
    return accuracy


def main(argv: list[str] | None = None) -> None:
    from editeval.data import load_dataset
    from editeval.models import load_pipeline

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Prints a Markdown table of each measure with the toy-world issue's bar; the "
               "numbers of the shipped weights: docs/toyworld.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="toy", help="suite name, or a text-to-image folder")
    parser.add_argument("--instruction-model", default=None,
                        help="instruction folder (none: the suite's instruction checkpoint)")
    parser.add_argument("--inpainting-model", default=None,
                        help="inpainting folder (none: the suite's inpainting checkpoint)")
    parser.add_argument("--samples", type=int, default=200,
                        help="random scenes for the VAE, inversion, text-to-image and CLIP rows "
                             "(InstructPix2Pix always edits all 210 editeval-toy pairs)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random scenes")
    parser.add_argument("--ip2p-steps", type=int, default=50,
                        help="InstructPix2Pix sampling steps (the paper's default is 100)")
    parser.add_argument("--skip", nargs="*", default=[], help="measures to leave out",
                        choices=["vae", "inversion", "t2i", "ip2p", "clip", "inpaint",
                                 "outpaint"])
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene(rng) for _ in range(args.samples)]
    sd = load_pipeline(args.model)
    rows = []
    if "vae" not in args.skip:
        rows.append(("VAE reconstruction PSNR (dB)", f"{vae_psnr(sd, scenes):.2f}", ">= 28"))
        rows.append(("object shapes the oracle reads back after the VAE (text-to-image ceiling)",
                     f"{100 * vae_shape_accuracy(sd, scenes):.1f}%", ""))
    if "inversion" not in args.skip:
        rows.append(("DDIM inversion + reconstruction PSNR, 50 steps, guidance 1 (dB)",
                     f"{inversion_psnr(sd, scenes):.2f}", ">= 25"))
    confusion = None
    if "t2i" not in args.skip:
        seen = [parse(image) for image in text_to_image_samples(sd, scenes)]
        accuracy, confusion = generation_accuracy(scenes, seen), shape_confusion(scenes, seen)
        for key in ("shape", "colour", "background"):
            rows.append((f"text-to-image {key} correct, 50 DDIM steps, guidance 7.5",
                         f"{100 * accuracy[key]:.1f}%", ">= 90%"))
    if "ip2p" not in args.skip:
        ip2p = load_pipeline(args.instruction_model or args.model, "instruction")
        samples = load_dataset("editeval-toy").samples  # all 210
        quality = instruction_edit_quality(ip2p, samples, args.ip2p_steps)
        rows.append((f"InstructPix2Pix oracle success, mean of 7 tasks ({args.ip2p_steps} steps)",
                     f"{100 * quality['success']:.1f}%", ">= 70%"))
        rows.append(("InstructPix2Pix unedited-region PSNR vs ground truth (dB)",
                     f"{quality['unedited_psnr']:.2f}", ">= 25"))
        for task, value in quality["success_per_task"].items():
            rows.append((f"  success on {task}", f"{100 * value:.1f}%", ""))
    if "clip" not in args.skip:
        from editeval.metrics import load_clip

        accuracy = clip_attribute_accuracy(load_clip(args.model), scenes)
        for attribute, value in accuracy.items():
            rows.append((f"CLIP prefers the caption to one with the {attribute} changed",
                         f"{100 * value:.1f}%", ""))
    if {"inpaint", "outpaint"} - set(args.skip):
        inpainter = load_pipeline(args.inpainting_model or args.model, "inpainting")
    if "inpaint" not in args.skip:
        quality = inpainting_quality(inpainter, scenes)
        rows.append(("inpainting: masked object restored (shape and colour), 50 steps, "
                     "guidance 7.5", f"{100 * quality['restored']:.1f}%", ">= 80%"))
        rows.append(("inpainting: masked object restored with every attribute",
                     f"{100 * quality['all_attributes']:.1f}%", ""))
        vae_error = quality["vae_unmasked_psnr"]
        rows.append(("inpainting: unmasked-region PSNR vs the scene (dB)",
                     f"{quality['unmasked_psnr']:.2f}", f">= {vae_error - 1:.2f} (VAE - 1 dB)"))
        rows.append(("VAE round trip: unmasked-region PSNR vs the scene (dB)", f"{vae_error:.2f}",
                     ""))
    if "outpaint" not in args.skip:
        quality = outpainting_quality(inpainter, scenes)
        rows.append(("outpainting the 8 px border: source pixels kept exactly",
                     f"{100 * quality['kept']:.1f}%", "100%"))
        rows.append(("outpainting: background correct", f"{100 * quality['background']:.1f}%",
                     ""))
        rows.append((f"outpainting: objects crossing the border correct (shape and colour, "
                     f"{quality['crossing_count']} objects)",
                     f"{100 * quality['crossing_objects']:.1f}%", ""))
    print("| measure | value | bar |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if confusion:
        print("\n| text-to-image: the caption's shape | drawn as it | read as instead |")
        print("|---|---|---|")
        for shape, counts in sorted(confusion.items()):
            others = ", ".join(f"{n} {read or 'nothing'}" for read, n in counts.most_common()
                               if read != shape)
            print(f"| {shape} | {counts[shape]} of {counts.total()} | {others or '-'} |")


if __name__ == "__main__":
    main()
