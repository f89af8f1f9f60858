"""loraflow: LoRA and QLoRA fine-tuning as a reproducible pipeline.

Nothing happens at import: no directories, no tracking URI, no logging setup.
"""

__version__ = "0.1.0"
