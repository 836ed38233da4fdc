"""esd-lora: erase concepts from diffusion models with LoRA adapters."""

__version__ = "0.1.0"
