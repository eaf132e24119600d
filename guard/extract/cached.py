"""A vector file reused when it fits, extracted (and its layer selected) when it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..core.vectors import PersonaVector
from ..errors import VectorFileError, VectorMismatchError
from ..traits import Trait
from .extraction import ExtractionConfig, extract_vector
from .selection import select_and_record


def load_or_extract(path: str | Path, model, tokenizer, trait: Trait, *, config: ExtractionConfig | None = None,
                    select_layer: bool = True, log: Callable[[str], None] = lambda message: None) -> PersonaVector:
    """The vector at ``path`` when it belongs to ``model`` (and has a recommended layer, when
    ``select_layer``); otherwise extract it, select its layer, and save it there.

    Args:
        path: the vector file to reuse or write.
        model, tokenizer: the model the vector is for.
        trait: the trait to extract when the file is missing or belongs to other weights.
        config: extraction settings (default: the ``default`` preset).
        select_layer: make sure the vector has a recommended layer (selected on the trait's
            selection pairs, see :meth:`guard.traits.Trait.split`).
        log: receives progress messages.
    """
    path = Path(path)
    vector = None
    if path.exists():
        try:
            vector = PersonaVector.load(path, model)
            log(f"using {path}")
        except (VectorMismatchError, VectorFileError) as exc:
            log(f"{path} cannot be reused ({exc}); extracting again")
    if vector is None:
        log(f"extracting the {trait.name} vector")
        vector = extract_vector(model, tokenizer, trait, config or ExtractionConfig.preset("default")).vector
        vector.save(path)
    if select_layer and vector.meta.recommended_layer is None:
        log(f"selecting a layer for {trait.name}")
        select_and_record(model, tokenizer, vector, trait, log=log)
        vector.save(path)
    return vector
