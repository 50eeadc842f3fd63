"""llave-kit: study, teach and reproduce hardness-weighted contrastive learning (LLaVE)."""

__version__ = "0.1.0"
