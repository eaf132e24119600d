"""persona-guard: persona vectors for monitoring and protecting a model's character during finetuning.

Data flow: model + trait -> vectors -> read (monitor | drift | screen) | steer (inference | training | harden).

    >>> from guard import load_model, load_trait, extract_vector
    >>> model, tokenizer, _ = load_model()              # embedded SmolLM2-135M-Instruct
    >>> result = extract_vector(model, tokenizer, load_trait("sycophancy"))
    >>> result.vector.save("sycophancy.safetensors")

The layout (docs/architecture.md): ``guard.core`` (models, layers, forward passes, readouts,
vectors, steering), then one package per feature: ``extract``, ``measure``, ``screen``,
``harden``, ``sae``, ``judges``, ``traits``; errors in ``guard.errors``.
"""

__version__ = "0.1.0"

from .core.generation import SamplingConfig
from .core.layers import LAYER_CONVENTION, capture, find_decoder_layers
from .core.models import load_model
from .core.readout import Readout
from .core.steering import Steering, add_vectors, project_out, steer
from .core.vectors import PersonaVector
from .errors import PersonaGuardError, VectorMismatchError
from .extract.cached import load_or_extract
from .extract.extraction import ExtractionConfig, extract_vector
from .traits import Trait, list_traits, load_trait

__all__ = [
    "ExtractionConfig", "LAYER_CONVENTION", "PersonaGuardError", "PersonaVector", "Readout", "SamplingConfig",
    "Steering", "Trait", "VectorMismatchError", "__version__", "add_vectors", "capture", "extract_vector",
    "find_decoder_layers", "list_traits", "load_model", "load_or_extract", "load_trait", "project_out", "steer",
]
