"""Models: the architectures visiontools registers with timm (:mod:`~visiontools.models.vit`), the
registry around them (:mod:`~visiontools.models.registry`), the checkpoints shipped in the package and
the one loader (:mod:`~visiontools.models.shipped`: ``load``, ``load_default_model``).

Importing this package registers the models with timm (``timm.create_model("hyena_vit_cifar")``).
``load(name_or_path)`` takes a shipped checkpoint name, a checkpoint file or a timm model name.
"""
from visiontools.models.registry import (  # noqa: F401 (the package's public names)
    CIFAR10_CLASSES,
    check_model_name,
    create_model,
    model_description,
)
from visiontools.models.shipped import (  # noqa: F401
    CHECKPOINT_DIR,
    DEFAULT_ARCHITECTURE,
    DEFAULT_CHECKPOINT,
    SHIPPED,
    checkpoint_card,
    is_checkpoint,
    load,
    load_checkpoint_model,
    load_default_model,
    recommended_r,
    resolve_checkpoint,
    ship_checkpoint,
    subset_accuracy,
)
from visiontools.models.vit import REGISTERED  # noqa: F401
