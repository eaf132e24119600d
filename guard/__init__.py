"""persona-guard: persona vectors for monitoring and protecting a model's character during finetuning.

Data flow: model + trait -> vectors -> (monitor | screen | steer | harden).

    >>> from guard import load_model, load_trait, extract_vector
    >>> model, tokenizer, _ = load_model()              # embedded SmolLM2-135M-Instruct
    >>> result = extract_vector(model, tokenizer, load_trait("sycophancy"))
    >>> result.vector.save("sycophancy.safetensors")
"""

__version__ = "0.1.0"

from .extract.extraction import ExtractionConfig, extract_vector
from .core.generation import SamplingConfig
from .core.layers import LAYER_CONVENTION, capture, find_decoder_layers
from .core.models import load_model
from .core.steering import Steering, add_vectors, project_out, steer
from .traits import Trait, list_traits, load_trait
from .core.vectors import PersonaVector, VectorMismatchError

__all__ = [
    "ExtractionConfig", "LAYER_CONVENTION", "PersonaVector", "SamplingConfig", "Trait", "VectorMismatchError",
    "__version__", "add_vectors", "capture", "extract_vector", "find_decoder_layers", "list_traits", "load_model",
    "load_trait", "steer", "Steering",
]
