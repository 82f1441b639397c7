"""Models: the one registry of models visiontools defines for timm, the checkpoints it ships, and
loading them (``load_checkpoint_model``, ``load_default_model``).

Importing this package registers the models with timm (``timm.create_model("hyena_vit_cifar")``).
"""
from visiontools.models.registry import (  # noqa: F401 (the package's public names)
    CHECKPOINT_DIR,
    DEFAULT_CHECKPOINT,
    SHIPPED,
    check_model_name,
    create_model,
    load_checkpoint_model,
    load_default_model,
    model_description,
    resolve_checkpoint,
    ship_checkpoint,
    subset_accuracy,
)
