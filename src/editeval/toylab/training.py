"""Training the toy world's models, with Stable Diffusion's architecture, on 2 CPU cores.

    python -m editeval.toylab.training data  --work toy_training
    python -m editeval.toylab.training vae   --work toy_training --steps 4000 --threads 2
    python -m editeval.toylab.training widen --work toy_training --steps 2000
    python -m editeval.toylab.training clip  --work toy_training --steps 4500 --threads 2
    python -m editeval.toylab.training clip  --work toy_training --steps 6500 --shape-negatives
    python -m editeval.toylab.training unet  --work toy_training --steps 6000 --threads 2
    python -m editeval.toylab.training ip2p  --work toy_training --steps 14000 --threads 2
    python -m editeval.toylab.training unet  --work toy_training --steps 16000 --threads 2
    python -m editeval.toylab.training inpaint --work toy_training --steps 6000
    python -m editeval.toylab.training export --work toy_training

(How the shipped CLIP got to its 4500 steps differs: see docs/toyworld.md. ``ip2p`` starts from
``unet.ckpt`` as it stands, for the shipped weights the 6000-step UNet, before its resume to 16000.)

(Checkpoints stay on the machine that trained them; ``import`` makes them again from the exported
weights, so a new machine goes on from the shipped models: ``data``, ``import``, then e.g. ``unet
--steps 26000``. The optimiser state is not exported, so the resumed stage warms up a fresh AdamW.
A resume with ``--restart-lr`` starts a new cosine schedule instead of stretching the old one.)

(``widen`` makes the shipped VAE, any time after ``vae``: twice as wide, its encoder distilled to
``vae.ckpt``'s posterior, so the latent space the UNets learn on does not change.)

Each stage is reproducible from ``--seed``, shows a progress bar, writes a checkpoint (model,
optimiser, step, random state) at least every ``--checkpoint-seconds`` and resumes from it when run
again, so a killed run loses at most that much work. ``export`` writes the diffusers pipelines
(model_index.json + safetensors, fp16) that the ``toy`` model suite loads.

Models:
- AutoencoderKL: 64x64x3 <-> 8x8x4 (SD's factor 8), trained with MSE (object pixels weighted 5x)
  plus a small KL term (weight 1e-6); the latent scaling factor is 1 / std of the training
  latents, as SD's 0.18215. The shipped VAE (``widen``) has twice its channels: an encoder
  distilled to give the same latents and a decoder trained on them with a contrast-normalised
  loss, which sharpens night scenes.
- CLIP (text and image towers, the real CLIP BPE tokenizer), trained contrastively on captions
  with NegCLIP's hard negatives: each caption also enters the batch with one object attribute
  (colour, size, texture, or shape with its pose) changed, so that the text tower must encode
  every attribute word (plain CLIP's loss let it nearly merge "circle" and "square"); with
  ``--shape-negatives`` a second one per caption that changes a shape, half of the time only its
  pose (those negatives are rare among the first kind; the shipped CLIP's last 2000 steps).
- UNet2DConditionModel on the frozen CLIP text tower, SD's noise schedule (scaled_linear,
  0.00085..0.012, 1000 steps), epsilon prediction, 10% caption dropout for classifier-free guidance.
- InstructPix2Pix-style UNet (8 input channels: noisy latents + the source's unscaled latents,
  as the pipeline feeds them) on instruction text, initialised as in the paper from the
  text-to-image UNet (``unet.ckpt``, so run ``unet`` first) with the new input channels zero, with
  the paper's conditioning dropout (5% text, 5% image, 5% both).
- Stable Diffusion inpainting UNet (9 input channels: noisy latents, the mask at latent size,
  the masked image's latents, as ``StableDiffusionInpaintPipeline`` feeds them), initialised from
  the text-to-image UNet (``unet.ckpt``) with the 5 new input channels zero, as SD inpainting was;
  trained on the scenes with captions (10% dropped) under :func:`inpainting_mask`'s masks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from editeval.toylab.models import (
    SCHEDULE, WIDE_VAE_WIDTHS, load_vae, load_weights, new_clip, new_unet,
    new_vae, read_latent_scale, save_checkpoint,
)
from editeval.toyworld.pairs import _objects_mask
from editeval.toyworld.scenes import SLOTS, hard_negative, render, sample_scene

OBJECT_WEIGHT = 5.0  # weight of object pixels in the VAE's reconstruction loss
WARMUP_STEPS = 200  # linear learning-rate warm-up of a fresh AdamW


# ----------------------------------------------------------------------------------------------
# checkpointed training loop
# ----------------------------------------------------------------------------------------------


class Checkpointed:
    """A model + AdamW optimiser whose state is saved atomically and restored on start.

    ``build`` makes the model after torch is seeded with ``seed``, so the initial weights depend on
    the seed alone.
    """

    def __init__(self, path: Path, build: Callable[[], torch.nn.Module], lr: float,
                 seed: int) -> None:
        torch.manual_seed(seed)
        self.path, self.lr = path, lr
        self.model = model = build()
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
        self.step = self.warmup_from = 0
        self.restart: dict | None = None
        self.rng = np.random.default_rng(seed)
        if path.exists():
            state = load_weights(model, path)
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.warmup_from = state["step"], state.get("warmup_from", 0)
            self.restart = state.get("restart")
            self.rng.bit_generator.state = state["numpy_rng"]
            torch.set_rng_state(state["torch_rng"])
        self._saved_at = time.monotonic()

    def save(self) -> None:
        save_checkpoint(self.path, self.model, self.step, optimizer=self.optimizer.state_dict(),
                        numpy_rng=self.rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                        warmup_from=self.warmup_from, restart=self.restart)
        self._saved_at = time.monotonic()

    def learning_rate(self, steps: int) -> float:
        """The rate of the current step of a run to ``steps``: cosine-decayed from the stage's
        ``lr`` at step 0 to 0 at ``steps``, or, after a restart, from the restart's rate at its
        step; warmed up linearly over ``WARMUP_STEPS`` from ``warmup_from``."""
        warmup = min(1.0, (self.step - self.warmup_from + 1) / WARMUP_STEPS)
        start, peak = (0, self.lr) if self.restart is None else (self.restart["step"],
                                                                  self.restart["lr"])
        return peak * 0.5 * (1 + np.cos(np.pi * (self.step - start) / (steps - start))) * warmup

    def train(self, steps: int, loss_fn, every_seconds: float, desc: str,
              restart_lr: float | None = None) -> None:
        """Run ``loss_fn(rng) -> loss`` until ``steps``, at :meth:`learning_rate`.

        The rate of each step is computed from the schedule and the step alone (not read back
        from the optimiser, whose saved state holds the last step's decayed rate), so a resumed
        run continues the schedule exactly. The rate warms up from the start, and again from an
        imported step (a fresh optimiser). A larger ``steps`` on a finished run stretches its
        cosine over the longer run, so the added steps run at small rates; ``restart_lr`` starts
        a new cosine at the checkpoint's step instead, from that rate (warmed up again) down to 0
        at ``steps``. The restart is stored in the checkpoint: a killed run resumed with the same
        ``restart_lr`` and ``steps`` continues it, with another value it restarts again.
        """
        asked = None if restart_lr is None else (restart_lr, steps)
        if asked is not None and asked != (self.restart or {}).get("asked"):
            self.restart = {"lr": restart_lr, "step": self.step, "asked": asked}
            self.warmup_from = self.step
        bar = tqdm(total=steps, initial=self.step, desc=desc, mininterval=10, smoothing=0.05)
        while self.step < steps:
            rate = self.learning_rate(steps)
            for group in self.optimizer.param_groups:
                group["lr"] = rate
            loss = loss_fn(self.rng)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if time.monotonic() - self._saved_at > every_seconds:
                self.save()
        self.save()
        bar.close()


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------


def make_data(work: Path, n_scenes: int, n_pairs: int, seed: int) -> None:
    """Render ``n_scenes`` random scenes and ``n_pairs`` edit pairs (all 7 tasks) to ``work``
    (either count 0 skips that part)."""
    from editeval.toyworld.pairs import sample_pair

    if n_scenes:
        rng = np.random.default_rng(seed)
        scenes = [sample_scene(rng) for _ in range(n_scenes)]
        images = [render(s) for s in tqdm(scenes, desc="rendering scenes", mininterval=10)]
        np.save(work / "scenes.npy", np.stack(images))
        (work / "captions.json").write_text(json.dumps([s.caption() for s in scenes]))
    if n_pairs:
        rng = np.random.default_rng(seed + 1)
        pairs = [sample_pair(rng) for _ in tqdm(range(n_pairs), desc="edit pairs", mininterval=10)]
        np.save(work / "pair_sources.npy", np.stack([p.source_image for p in pairs]))
        np.save(work / "pair_targets.npy", np.stack([p.target_image for p in pairs]))
        (work / "instructions.json").write_text(json.dumps([p.instruction for p in pairs]))


def _pixels(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _reconstruction_loss(recon: torch.Tensor, x: torch.Tensor,
                         reference_variance: float | None = None) -> torch.Tensor:
    """MSE with object pixels (saturation above 0.5; backgrounds stay below) weighted
    ``OBJECT_WEIGHT``: they cover a tenth of an image and carry every attribute the oracle reads.

    With ``reference_variance``, contrast-normalised: each image's weighted MSE is multiplied by
    ``reference_variance`` over the image's own pixel variance, so that a night scene (gain 0.35:
    an eighth of a photo's variance, and errors that look 3 times larger once brightened) weighs
    as much as a photo instead of an eighth. ``recon``, ``x``: float (B, 3, H, W) in [-1, 1].
    """
    rgb = (x + 1) / 2
    high = rgb.amax(1, keepdim=True)
    saturated = (high - rgb.amin(1, keepdim=True)) / high.clamp(min=1e-3) > 0.5
    weight = 1 + (OBJECT_WEIGHT - 1) * saturated.float()
    if reference_variance is None:
        return (weight * (recon - x) ** 2).mean() / weight.mean()
    dims = (1, 2, 3)
    per_image = (weight * (recon - x) ** 2).mean(dim=dims) / weight.mean(dim=dims)
    return (per_image * reference_variance / x.var(dim=dims)).mean()


def train_vae(work: Path, steps: int, seed: int, every: float, batch: int = 32,
              restart_lr: float | None = None) -> None:
    images = np.load(work / "scenes.npy")
    run = Checkpointed(work / "vae.ckpt", new_vae, lr=1e-3, seed=seed)

    def loss_fn(rng):
        x = _pixels(images[rng.integers(0, len(images), batch)])
        posterior = run.model.encode(x).latent_dist
        recon = run.model.decode(posterior.sample()).sample
        return _reconstruction_loss(recon, x) + 1e-6 * posterior.kl().mean()

    run.train(steps, loss_fn, every, "vae", restart_lr)


def posterior_distillation_loss(student, teacher, x: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """How far ``student``'s posterior over the latents of ``x`` is from ``teacher``'s: the MSE
    of the means in the UNets' scaled units (times ``scale``, the latent scaling factor) plus the
    MSE of the log-variances (the teacher's clamped as diffusers clamps them, to [-30, 20]).
    Also returns the teacher's posterior mean (no gradient). ``x``: float (B, 3, H, W) in
    [-1, 1]; the means are (B, 4, H / 8, W / 8), unscaled."""
    with torch.no_grad():
        target_mean, target_logvar = teacher.quant_conv(teacher.encoder(x)).chunk(2, dim=1)
    mean, logvar = student.quant_conv(student.encoder(x)).chunk(2, dim=1)
    loss = (F.mse_loss(mean * scale, target_mean * scale)
            + F.mse_loss(logvar, target_logvar.clamp(-30.0, 20.0)))
    return loss, target_mean


def train_widen(work: Path, steps: int, seed: int, every: float, batch: int = 32,
                restart_lr: float | None = None) -> None:
    """A wider VAE (``WIDE_VAE_WIDTHS``, ``vae_wide.ckpt``) in the latent space of ``vae.ckpt``,
    so that every UNet trained on that VAE's latents works with it unchanged.

    - Its encoder is distilled from ``vae.ckpt``'s: its posterior (mean and log-variance, the
      moments after ``quant_conv``) is fitted to the teacher's by MSE, the mean's in the UNets'
      scaled units.
    - Its decoder learns, from scratch, to reconstruct each image from the teacher's posterior
      mean, the latents the UNets learn on and draw (``_latents``): decoding posterior samples,
      whose noise has a std of 0.17 of the latents' spread, taught a decoder to blur. The loss is
      the contrast-normalised one, so that night scenes (a third of a photo's contrast) weigh as
      much as photos.

    diffusers' ``AutoencoderKL`` gives its encoder and decoder one width, so a wider decoder needs
    a wider encoder. The two halves learn independently (the decoder reads the teacher's
    latents), with one AdamW.
    """
    images = np.load(work / "scenes.npy")
    reference_variance = float(_pixels(images[:2000]).var(dim=(1, 2, 3)).mean())
    teacher = load_vae(work / "vae.ckpt")
    scale = latent_scale(work)
    run = Checkpointed(work / "vae_wide.ckpt", lambda: new_vae(WIDE_VAE_WIDTHS), lr=1e-3,
                       seed=seed)

    def loss_fn(rng):
        x = _pixels(images[rng.integers(0, len(images), batch)])
        distillation, target_mean = posterior_distillation_loss(run.model, teacher, x, scale)
        recon = run.model.decode(target_mean).sample
        return _reconstruction_loss(recon, x, reference_variance) + distillation

    run.train(steps, loss_fn, every, "widen", restart_lr)


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss with NegCLIP's hard negatives (Yuksekgonul et al., "When and
    Why Vision-Language Models Behave like Bags-of-Words, and What to Do About It?", ICLR 2023,
    arXiv:2210.01936).

    ``logits_per_image``: (B, B + K) scaled image-text similarities, the first B texts the
    images' captions in order and the other K hard negatives. Each image picks its caption among
    all B + K texts; each caption picks its image among the B images. K = 0 is CLIP's loss.
    """
    batch = logits_per_image.shape[0]
    target = torch.arange(batch, device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target)
            + F.cross_entropy(logits_per_image[:, :batch].T, target)) / 2


def train_clip(work: Path, steps: int, seed: int, every: float, batch: int = 128,
               shape_negatives: bool = False, restart_lr: float | None = None) -> None:
    """CLIP's contrastive training with one :func:`hard_negative` per caption, and with
    ``shape_negatives`` a second one that changes a shape, to its other pose alone half of the
    time (the batch then holds B captions and 2B negatives)."""
    from editeval.models.tokenizer import clip_tokenizer

    images = np.load(work / "scenes.npy")
    captions = json.loads((work / "captions.json").read_text())
    tokenizer = clip_tokenizer()
    run = Checkpointed(work / "clip.ckpt", new_clip, lr=5e-4, seed=seed)

    def loss_fn(rng):
        index = rng.integers(0, len(images), batch)
        texts = [captions[i] for i in index]
        negatives = [hard_negative(text, rng) for text in texts]
        if shape_negatives:
            negatives += [hard_negative(text, rng, "shape", pose_flip=0.5) for text in texts]
        texts += negatives
        pixels = _pixels(images[index])  # CLIP normalisation is part of export (image processor)
        out = run.model(input_ids=_tokenize(tokenizer, texts), pixel_values=pixels)
        return contrastive_loss(out.logits_per_image)

    run.train(steps, loss_fn, every, "clip", restart_lr)


def _frozen(work: Path):
    """The trained VAE and CLIP text tower (eval mode, no gradients) and the tokenizer."""
    from editeval.models.tokenizer import clip_tokenizer

    vae, clip = load_vae(work / "vae.ckpt"), new_clip()
    load_weights(clip, work / "clip.ckpt")
    clip.eval().requires_grad_(False)
    return vae, clip, clip_tokenizer()


@torch.no_grad()
def _latents(vae, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(_pixels(images[i:i + chunk])).latent_dist.mean
                      for i in range(0, len(images), chunk)])


@torch.no_grad()
def _text_states(clip, tokenizer, texts: list[str], chunk: int = 256) -> torch.Tensor:
    """Last hidden states of the text tower, (N, 77, TEXT_DIM), as SD conditions on them."""
    return torch.cat([clip.text_model(_tokenize(tokenizer, texts[i:i + chunk])).last_hidden_state
                      for i in range(0, len(texts), chunk)]).half()


def _cached(path: Path, compute, count: int) -> torch.Tensor:
    """``compute()`` (one row per training item), stored at ``path`` and read back from it while it
    still has ``count`` rows: a cache of a data set that has since been rendered again at another
    size is recomputed, not silently paired with the wrong images or captions."""
    if path.exists():
        value = torch.load(path)
        if len(value) == count:
            return value
        tqdm.write(f"{path.name} holds {len(value)} rows for {count} items: recomputing")
    value = compute()
    torch.save(value, path)
    return value


def latent_scale(work: Path) -> float:
    """1 / std of the VAE latents of the training scenes (stored once computed)."""
    path = work / "latent_scale.json"
    if not path.exists():
        vae, _, _ = _frozen(work)
        latents = _latents(vae, np.load(work / "scenes.npy")[:2048])
        path.write_text(json.dumps({"scaling_factor": float(1 / latents.std())}))
    return read_latent_scale(work)


def train_unet(work: Path, steps: int, seed: int, every: float, batch: int = 64,
               restart_lr: float | None = None) -> None:
    from diffusers import DDPMScheduler

    vae, clip, tokenizer = _frozen(work)
    scale = latent_scale(work)
    captions = json.loads((work / "captions.json").read_text())
    n = len(captions)
    latents = _cached(work / "scene_latents.pt",
                      lambda: _latents(vae, np.load(work / "scenes.npy")), n)
    texts = _cached(work / "caption_states.pt",
                    lambda: _text_states(clip, tokenizer, captions), n)
    empty = _text_states(clip, tokenizer, [""]).float()
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    run = Checkpointed(work / "unet.ckpt", lambda: new_unet(4), lr=3e-4, seed=seed)

    def loss_fn(rng):
        index = torch.from_numpy(rng.integers(0, len(latents), batch))
        x0 = latents[index] * scale
        cond = texts[index].float()
        drop = torch.from_numpy(rng.random(batch) < 0.1)
        cond[drop] = empty
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        noisy = noise_scheduler.add_noise(x0, noise, t)
        return F.mse_loss(run.model(noisy, t, encoder_hidden_states=cond).sample, noise)

    run.train(steps, loss_fn, every, "unet", restart_lr)


def unet_with_inputs(t2i, in_channels: int) -> torch.nn.Module:
    """The text-to-image UNet ``t2i`` with input channels added after its 4, their weights zero,
    so that it starts as the text-to-image model: InstructPix2Pix's initialisation (8 channels)
    and Stable Diffusion inpainting's (9)."""
    weights = t2i.state_dict()
    conv_in = weights["conv_in.weight"]
    extra = conv_in.new_zeros(conv_in.shape[0], in_channels - conv_in.shape[1], *conv_in.shape[2:])
    weights["conv_in.weight"] = torch.cat([conv_in, extra], dim=1)
    unet = new_unet(in_channels)
    unet.load_state_dict(weights)
    return unet


def train_ip2p(work: Path, steps: int, seed: int, every: float, batch: int = 64,
               restart_lr: float | None = None) -> None:
    from diffusers import DDPMScheduler

    vae, clip, tokenizer = _frozen(work)
    scale = latent_scale(work)
    instructions = json.loads((work / "instructions.json").read_text())
    n = len(instructions)
    sources = _cached(work / "pair_source_latents.pt",
                      lambda: _latents(vae, np.load(work / "pair_sources.npy")), n)
    targets = _cached(work / "pair_target_latents.pt",
                      lambda: _latents(vae, np.load(work / "pair_targets.npy")), n)
    texts = _cached(work / "instruction_states.pt",
                    lambda: _text_states(clip, tokenizer, instructions), n)
    empty = _text_states(clip, tokenizer, [""]).float()
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    def build():
        t2i = new_unet(4)
        load_weights(t2i, work / "unet.ckpt")
        return unet_with_inputs(t2i, 8)

    run = Checkpointed(work / "ip2p.ckpt", build, lr=3e-4, seed=seed)

    def loss_fn(rng):
        index = torch.from_numpy(rng.integers(0, len(targets), batch))
        # the source is conditioned on unscaled (mode) latents, as in the authors' code and in
        # diffusers' pipeline (``prepare_image_latents``); only the noised target is scaled
        x0, source = targets[index] * scale, sources[index]
        cond = texts[index].float()
        u = torch.from_numpy(rng.random(batch))
        cond[(u < 0.05) | (u >= 0.10) & (u < 0.15)] = empty  # text dropped: 5% alone, 5% with image
        source = source * ((u < 0.05) | (u >= 0.15)).float()[:, None, None, None]  # image dropped
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        noisy = torch.cat([noise_scheduler.add_noise(x0, noise, t), source], dim=1)
        return F.mse_loss(run.model(noisy, t, encoder_hidden_states=cond).sample, noise)

    run.train(steps, loss_fn, every, "ip2p", restart_lr)


# kinds of training mask and their shares: the object masks of the toy pairs and their boxes,
# LaMa-style rectangles and thick strokes (Stable Diffusion inpainting's synthetic masks), the
# border of an outpainting, and the whole image (SD: a quarter of its masks; here a tenth)
MASK_KINDS = {"object": 0.3, "box": 0.15, "rectangles": 0.15, "strokes": 0.15, "border": 0.15,
              "everything": 0.1}


def inpainting_mask(rng: np.random.Generator, objects: np.ndarray, size: int = 64) -> np.ndarray:
    """A random training mask, bool (size, size), True = to inpaint, of a kind drawn from
    ``MASK_KINDS``. ``objects``: bool (n, size, size), the object masks of the scene (the toy
    pairs' masks: footprints dilated by 2 px); ``box`` is one's bounding box grown by 0 to 6 px;
    ``border`` keeps a centre box and masks 6 to 20 px on one to four sides."""
    kind = rng.choice(list(MASK_KINDS), p=list(MASK_KINDS.values()))
    mask = np.zeros((size, size), dtype=bool)
    if kind == "everything":
        mask[:] = True
    elif kind in ("object", "box") and len(objects):
        chosen = objects[rng.integers(0, len(objects))]
        if kind == "object":
            return chosen.copy()
        rows, cols = np.flatnonzero(chosen.any(1)), np.flatnonzero(chosen.any(0))
        grow = rng.integers(0, 7, size=4)
        mask[max(0, rows[0] - grow[0]):rows[-1] + 1 + grow[1],
             max(0, cols[0] - grow[2]):cols[-1] + 1 + grow[3]] = True
    elif kind == "border":
        sides = rng.random(4) < 0.5
        sides[rng.integers(0, 4)] = True
        top, bottom, left, right = np.where(sides, rng.integers(6, 21, size=4), 0)
        mask[:] = True
        mask[top:size - bottom, left:size - right] = False
    elif kind == "strokes":
        from PIL import Image, ImageDraw

        canvas = Image.new("L", (size, size))
        draw = ImageDraw.Draw(canvas)
        for _ in range(rng.integers(1, 4)):
            corners = rng.integers(0, size, size=(rng.integers(2, 5), 2))
            points = [tuple(p) for p in corners.tolist()]
            draw.line(points, fill=255, width=int(rng.integers(4, 13)), joint="curve")
        mask = np.asarray(canvas) > 0
    else:  # rectangles, and an object kind drawn for a scene without objects
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(8, 33, size=2)
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            mask[y:y + h, x:x + w] = True
    return mask


def _object_masks(seed: int, captions: list[str]) -> torch.Tensor:
    """The object masks of the training scenes, bool packed along the width: uint8
    (N, 3, 64, 8), one per slot (left, middle, right; empty where the slot has none). The scenes
    are sampled again from the data stage's ``seed`` and checked against ``captions``."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(captions), len(SLOTS), 64, 64), dtype=bool)
    for i, caption in enumerate(tqdm(captions, desc="object masks", mininterval=10)):
        scene = sample_scene(rng)
        if scene.caption() != caption:
            raise ValueError(f"scene {i} of seed {seed} is not the one in captions.json: run the "
                             "inpaint stage with the --seed the data stage used")
        for obj in scene.objects:
            masks[i, list(SLOTS).index(obj.slot)] = _objects_mask([obj], 64)
    return torch.from_numpy(np.packbits(masks, axis=-1))


@torch.no_grad()
def inpainting_condition(vae, pixels: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The inpainting UNet's extra inputs as ``StableDiffusionInpaintPipeline`` makes them: the
    mask resized to the latents (``interpolate``'s nearest default), float (B, 1, H / 8, W / 8),
    and the latents of ``pixels * (mask < 0.5)`` (a posterior sample times ``scale``), float
    (B, 4, H / 8, W / 8). ``pixels``: float (B, 3, H, W) in [-1, 1]; ``mask``: float
    (B, 1, H, W), 1 = to inpaint."""
    masked = vae.encode(pixels * (mask < 0.5)).latent_dist.sample() * scale
    return F.interpolate(mask, size=masked.shape[-2:]), masked


def train_inpaint(work: Path, steps: int, seed: int, every: float, batch: int = 32,
                  restart_lr: float | None = None) -> None:
    """Stable Diffusion inpainting's training on the toy scenes.

    The UNet sees ``cat(noisy latents, mask, masked-image latents)``, built as
    ``StableDiffusionInpaintPipeline`` builds them: the mask resized to the latents with
    ``interpolate``'s nearest default, the masked image ``image * (mask < 0.5)`` (0, mid-grey in
    [-1, 1], where masked) encoded by the VAE (a posterior sample, times the scaling factor).
    """
    from diffusers import DDPMScheduler

    vae, clip, tokenizer = _frozen(work)
    scale = latent_scale(work)
    captions = json.loads((work / "captions.json").read_text())
    n = len(captions)
    images = np.load(work / "scenes.npy")
    latents = _cached(work / "scene_latents.pt", lambda: _latents(vae, images), n)
    texts = _cached(work / "caption_states.pt",
                    lambda: _text_states(clip, tokenizer, captions), n)
    objects = _cached(work / "scene_object_masks.pt",
                      lambda: _object_masks(seed, captions), n)
    empty = _text_states(clip, tokenizer, [""]).float()
    noise_scheduler = DDPMScheduler(**SCHEDULE)

    def build():
        t2i = new_unet(4)
        load_weights(t2i, work / "unet.ckpt")
        return unet_with_inputs(t2i, 9)

    run = Checkpointed(work / "inpaint.ckpt", build, lr=2e-4, seed=seed)

    def loss_fn(rng):
        index = rng.integers(0, n, batch)
        scene_masks = np.unpackbits(objects[torch.from_numpy(index)].numpy(), axis=-1).astype(bool)
        masks = np.stack([inpainting_mask(rng, m[m.any((1, 2))]) for m in scene_masks])
        mask = torch.from_numpy(masks)[:, None].float()
        condition = inpainting_condition(vae, _pixels(images[index]), mask, scale)
        index = torch.from_numpy(index)
        x0 = latents[index] * scale
        cond = texts[index].float()
        cond[torch.from_numpy(rng.random(batch) < 0.1)] = empty
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        noisy = torch.cat([noise_scheduler.add_noise(x0, noise, t), *condition], dim=1)
        return F.mse_loss(run.model(noisy, t, encoder_hidden_states=cond).sample, noise)

    run.train(steps, loss_fn, every, "inpaint", restart_lr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Stages, in order: data, vae, widen, clip, unet, ip2p and inpaint (start from "
               "unet.ckpt), export. Every stage resumes from its checkpoint in --work when run "
               "again. To go on from the shipped weights on a new machine: data, then import, "
               "then the stage with more --steps. The commands and measured times of the shipped weights: "
               "docs/toyworld.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("stage", help="what to build",
                        choices=["data", "vae", "widen", "clip", "unet", "ip2p", "inpaint",
                                 "export", "import"])
    parser.add_argument("--work", type=Path, default=Path("toy_training"),
                        help="folder for the data, checkpoints and logs of every stage")
    parser.add_argument("--steps", type=int, default=3000,
                        help="train until this optimiser step (a larger value on a finished run "
                             "resumes it with a longer cosine schedule)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and initial weights")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--checkpoint-seconds", type=float, default=120.0,
                        help="write a resumable checkpoint at least this often")
    parser.add_argument("--scenes", type=int, default=20000,
                        help="data: rendered scenes with captions (for the VAE, CLIP and UNet)")
    parser.add_argument("--pairs", type=int, default=20000,
                        help="data: edit pairs with instructions (for InstructPix2Pix)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="import: the exported weights to make checkpoints of (default: the "
                             "shipped ones)")
    parser.add_argument("--restart-lr", type=float, default=None, metavar="RATE",
                        help="training stages: instead of stretching the finished run's cosine "
                             "schedule over the larger --steps, start a new one at the "
                             "checkpoint's step, from RATE (warmed up again) down to 0 at --steps")
    parser.add_argument("--shape-negatives", action="store_true",
                        help="clip: a second hard negative per caption that changes a shape, half "
                             "of the time only its pose (the shipped CLIP's last 2000 steps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "data":
        make_data(args.work, args.scenes, args.pairs, args.seed)
    elif args.stage == "export":
        from editeval.toylab.export import export

        export(args.work)
    elif args.stage == "import":
        from editeval.toylab.export import import_checkpoints
        from editeval.toyworld.models import WEIGHTS

        steps = import_checkpoints(args.work, args.weights or WEIGHTS, args.seed)
        print("imported " + ", ".join(f"{name}.ckpt (step {step})" for name, step in steps.items()))
    else:
        trainer = {"vae": train_vae, "widen": train_widen, "clip": train_clip,
                   "unet": train_unet, "ip2p": train_ip2p,
                   "inpaint": train_inpaint}[args.stage]
        extra = {"shape_negatives": args.shape_negatives} if args.stage == "clip" else {}
        trainer(args.work, args.steps, args.seed, args.checkpoint_seconds,
                restart_lr=args.restart_lr, **extra)


if __name__ == "__main__":
    main()
