"""editeval: reproducible, measurable diffusion-model-based image editing.

Implements the system of "Diffusion Model-Based Image Editing: A Survey" (Huang et al., TPAMI 2025,
arXiv:2402.17525): editing methods behind one API, the EditEval benchmark and its runner.

Quick use::

    from editeval import EditRequest, edit
    result = edit(EditRequest("photo.jpg", target_prompt="a dog on a sofa"), "sdedit", model="sd15")
    result.image.save("out.png"); print(result.nfe)
"""

__version__ = "0.1.0"

from editeval.core import EditRequest, EditResult, list_methods  # noqa: E402
from editeval.editing import edit  # noqa: E402
from editeval.models import load_pipeline  # noqa: E402

__all__ = ["EditRequest", "EditResult", "__version__", "edit", "list_methods", "load_pipeline"]
