"""Built-in editing methods, one module each, grouped by the survey's learning strategy.

Importing this package registers them (see :mod:`editeval.core.registry`).
"""

# noqa: F401 throughout: importing a module registers its method
from editeval.methods.test_time_finetuning import cds, dds, null_text  # noqa: F401
from editeval.methods.training_based import instructpix2pix  # noqa: F401
from editeval.methods.training_free import (  # noqa: F401
    aidi,
    cyclediffusion,
    ddpm_inversion,
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
    sdedit,
    sega,
)
