"""condense: dataset distillation (condensation) toolkit."""

__version__ = "0.1.0"
