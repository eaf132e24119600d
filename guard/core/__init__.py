"""The core every feature stands on: loading models, finding layers, reading activations
(forward passes and readouts), the vector file format, and steering.

* :mod:`.models`     the one way to load a model (embedded GGUF, hub id, directory)
* :mod:`.layers`     decoder-block discovery and hooks: capture, stop_after
* :mod:`.forward`    tokenising chat inputs, batch plans, padding, forwards stopped at a layer, OOM back-off
* :mod:`.readout`    projections of activations on persona vectors (drift, monitor, screening)
* :mod:`.vectors`    the vector file format and the one check that a vector fits a model
* :mod:`.steering`   steering operators (add, ablate, ablate-then-add, incremental) as hooks
* :mod:`.generation` batched, reproducible generation and its on-disk cache
* :mod:`.chat`       prompts through chat templates
* :mod:`.data`       prompt files, JSONL with line-numbered errors, A/B items
* :mod:`.stats`      AUROC, random directions, bootstrap confidence intervals
"""
