"""Where the shipped toy weights live inside the package."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_DIR = WEIGHTS_DIR / "model"
CLASSIFIER_PATH = WEIGHTS_DIR / "classifier.safetensors"
