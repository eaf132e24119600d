"""TrainerCallback classes (drift monitoring, preventative steering), installed as ``guard.callbacks``."""
