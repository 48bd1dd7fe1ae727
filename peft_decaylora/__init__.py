"""DecayLoRA for PEFT: LoRA whose frozen pretrained weight fades out, so fine-tuning also compresses the model.
Importing it adds ``DECAYLORA`` to ``peft.PeftType`` and registers the config and tuner with PEFT, so
``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` work."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from .compression import CompressedLayer, CompressionError, compress_and_unload, load_compressed, save_compressed
from .config import DecayLoraConfig
from .layer import DecayLoraLayer, DecayLoraModule
from .model import DecayLoraModel
from .peft_type import PEFT_TYPE_NAME, extend_peft_type
from .schedule import decay_factor, noise_active, noise_scale
from .svd import initialize_from_activations
from .training import DecayLoraCallback, attach_schedule

__version__ = "0.2.0"

PEFT_TYPE = extend_peft_type()
if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is not DecayLoraModel:  # not when the package is imported again
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=DecayLoraConfig, model_cls=DecayLoraModel)
if not (PeftType(PEFT_TYPE_NAME) is PEFT_TYPE and PEFT_TYPE in list(PeftType)
        and PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE) is DecayLoraConfig):
    raise RuntimeError("peft_decaylora could not register DECAYLORA with PEFT: the installed PEFT or Python changed "
                       "how PeftType and its registry work; please report their versions.")

__all__ = ["CompressedLayer", "CompressionError", "DecayLoraCallback", "DecayLoraConfig", "DecayLoraLayer",
           "DecayLoraModel", "DecayLoraModule", "PEFT_TYPE", "attach_schedule", "compress_and_unload", "decay_factor",
           "initialize_from_activations", "load_compressed", "noise_active", "noise_scale", "save_compressed"]
