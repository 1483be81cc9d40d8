"""raml-kd: knowledge distillation for resolution-asymmetric image retrieval."""

__version__ = "0.1.0"
