"""The LMM Score protocol: what the judge is asked, and how its four sub-scores combine.

LMM Score is the metric of "Diffusion Model-Based Image Editing: A Survey" (Huang et al., TPAMI
2025, arXiv:2402.17525, section 8). A large multimodal model scores every edited image on four
factors, integers 1..10:

- editing accuracy (S_acc): how closely the edit follows the instruction;
- contextual preservation (S_pre): whether what should not change stayed as it was;
- visual quality (S_qua): the overall quality of the image;
- logical realism (S_real): whether the result obeys physical common sense.

S_all = 0.4 S_acc + 0.3 S_pre + 0.2 S_qua + 0.1 S_real, computed by us, never by the judge.

Two modes:
- ``comparative`` (the survey's protocol): one conversation per source image showing the source, the
  task, the instruction and every method's output in a shuffled order (recorded), the judge told to
  consider each factor for this case, to compare and to avoid ties. Deviation: the survey's session
  is multi-turn (describe, then images one by one, then scores); ours is one request carrying all
  images, which providers handle the same way and which can be cached and retried as a unit.
- ``per-image``: one request per edit (source and one output), for large runs.

The prompts are our own words. ``PROTOCOL_VERSION`` is stored with every score; a user template
(``--template FILE``) gets the version ``custom-<sha256 prefix>``. A template is plain text with
the placeholders ``{task}``, ``{instruction}`` and ``{n_images}``; the answer format below is always
appended, so parsing stays strict.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROTOCOL_VERSION = "editeval-lmm-1"
MODES = ("comparative", "per-image")

SYSTEM_PROMPT = (
    "You are a meticulous evaluator of image editing results. You judge edited images against "
    "their source image and an editing instruction, and you answer with exact integer scores."
)

DEFAULT_TEMPLATE = """\
The first image is the SOURCE image. The task is: {task}. The editing instruction was:
"{instruction}"

The next {n_images} image(s) are edits of the source made by different methods, labelled Image 1
to Image {n_images} in the order shown. Look at each one carefully and compare them.

Score every edited image on four factors, each an integer from 1 (worst) to 10 (best):
1. accuracy: how precisely the edit carries out the instruction.
2. preservation: how well the parts of the source that the instruction does not concern are kept.
3. quality: the overall visual quality of the edited image (sharpness, artefacts, coherence).
4. realism: how logically and physically plausible the edited image is.

First, say briefly what matters for each factor in this particular case and analyse each image.
Compare the images with each other and avoid giving two images identical scores where you can
tell them apart."""

ANSWER_FORMAT = """\
End your answer with one JSON object, and nothing after it, of exactly this form:
{{"scores": [{{"image": 1, "accuracy": <1-10>, "preservation": <1-10>, "quality": <1-10>, \
"realism": <1-10>}}, ...]}}
with one entry for each of the {n_images} edited image(s), integers only."""


@dataclass(frozen=True)
class Protocol:
    """A prompt template and its version."""

    template: str = DEFAULT_TEMPLATE
    version: str = PROTOCOL_VERSION
    mode: str = "comparative"

    @staticmethod
    def from_file(path: str | Path, mode: str = "comparative") -> Protocol:
        """A user template; its version is ``custom-`` + the first 12 hex digits of its sha256.

        Raises:
            ValueError: the template names an unknown placeholder.
        """
        text = Path(path).read_text()
        try:
            text.format(task="t", instruction="i", n_images=1)
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"template {path}: unknown placeholder {err}; use {{task}}, {{instruction}} and "
                "{n_images} (double other braces)"
            ) from None
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return Protocol(text, f"custom-{digest}", mode)

    def prompt(self, task: str, instruction: str, n_images: int) -> str:
        """The user text of one request (template then answer format)."""
        readable_task = task.replace("_", " ")
        body = self.template.format(task=readable_task, instruction=instruction, n_images=n_images)
        return body + "\n\n" + ANSWER_FORMAT.format(n_images=n_images)
