"""Reading a model's character: judge-free behaviour metrics, steering sweeps, the pre-response
monitor and the finetuning drift."""
