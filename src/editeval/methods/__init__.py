"""Built-in editing methods, one module each, grouped by the survey's learning strategy.

Importing this package registers them (see :mod:`editeval.core.registry`).
"""

from editeval.methods.training_based import instructpix2pix  # noqa: F401
from editeval.methods.training_free import masactrl, pnp  # noqa: F401
from editeval.methods.training_free import aidi  # noqa: F401
from editeval.methods.training_free import ddpm_inversion  # noqa: F401
from editeval.methods.training_free import edict  # noqa: F401
from editeval.methods.training_free import sdedit  # noqa: F401
from editeval.methods.test_time_finetuning import null_text  # noqa: F401
from editeval.methods.training_free import (  # noqa: F401
    direct_inversion, negative_prompt_inversion, prompt_to_prompt, proxedit)
