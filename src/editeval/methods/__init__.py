"""Built-in editing methods, one module each, grouped by the survey's learning strategy.

Importing this package registers them (see :mod:`editeval.core.registry`).
"""

# noqa: F401 throughout: importing a module registers its method
from editeval.methods.test_time_finetuning import (  # noqa: F401
    cds,
    dds,
    diffusion_disentanglement,
    forgedit,
    imagic,
    null_text,
    sine,
)
from editeval.methods.training_based import (  # noqa: F401
    instructpix2pix,
    outpainting,
    sd_inpainting,
)
from editeval.methods.training_free import (  # noqa: F401
    aidi,
    blended_diffusion,
    blended_latent_diffusion,
    cyclediffusion,
    ddpm_inversion,
    diffedit,
    differential_diffusion,
    direct_inversion,
    ebca,
    edict,
    ledits,
    ledits_pp,
    masactrl,
    negative_prompt_inversion,
    pix2pix_zero,
    pnp,
    prompt_to_prompt,
    proxedit,
    repaint,
    sdedit,
    sega,
)
