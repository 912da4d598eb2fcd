"""dino_fast: a performance-engineered DINO self-supervised pretraining engine."""
__version__ = "0.1.0"
