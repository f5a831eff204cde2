"""autotune: find the best deployable fine-tuned small language model for your hardware."""

__version__ = "0.1.0"
