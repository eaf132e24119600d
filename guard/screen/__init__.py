"""Screening finetuning data: which samples would push the model toward a trait."""
