"""The toy world, a plug-in of esd-lora: the named model `toy`, scored by the toy classifier.

Registered under the `esd_lora_models` entry point group (pyproject.toml), so the generic code finds it
by name and never imports it.
"""

from ..models import NamedModel
from .paths import MODEL_DIR


def _scorer():
    from .scoring import ToyScorer

    return ToyScorer()


def _renders(concept: str, n: int, seed: int):
    from .scoring import concept_renders

    return concept_renders(concept, n, seed)


MODEL = NamedModel(folder=lambda: MODEL_DIR, scorer=_scorer, licence="apache-2.0",
                   missing="run `esd-lora toy build --install`", images=_renders)
