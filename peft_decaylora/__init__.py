"""DecayLoRA for PEFT: LoRA whose frozen pretrained weight fades out, so fine-tuning also compresses the model.

Importing this package adds ``DECAYLORA`` to ``peft.PeftType`` and registers the config and tuner with PEFT, so
``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` work.
"""

from peft.utils import register_peft_method
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .calibration import initialize_from_activations
from .compression import CompressedLayer, CompressionError, compress_and_unload, load_compressed, save_compressed
from .config import DecayLoraConfig
from .layer import DecayLoraLayer, DecayLoraModule
from .model import DecayLoraModel
from .peft_type import PEFT_TYPE_NAME, extend_peft_type
from .schedule import decay_factor, noise_active, noise_scale
from .training import DecayLoraCallback, attach_schedule

__version__ = "0.1.0"

PEFT_TYPE = extend_peft_type()
if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is not DecayLoraModel:
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=DecayLoraConfig, model_cls=DecayLoraModel)
if PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE) is not DecayLoraConfig:
    raise RuntimeError("peft_decaylora: registering DecayLoraConfig with PEFT failed; PEFT's registry changed.")

__all__ = [
    "DecayLoraCallback",
    "attach_schedule",
    "CompressedLayer",
    "CompressionError",
    "DecayLoraConfig",
    "DecayLoraLayer",
    "DecayLoraModel",
    "DecayLoraModule",
    "PEFT_TYPE",
    "compress_and_unload",
    "decay_factor",
    "initialize_from_activations",
    "load_compressed",
    "noise_active",
    "noise_scale",
    "save_compressed",
]
