"""Model layers: the 2D Hyena operator, Conformer blocks, LSH attention, reversible layers, and the
token-grid bookkeeping they share. Plain ``torch.nn`` modules; no model library imported."""


def bound_class(cls: type, **fixed) -> type:
    """``cls``, or a subclass of it (same name) that always passes ``fixed`` to the constructor: timm's
    ``Block`` calls ``attn_layer`` with a fixed argument set, so a mixer's own options are bound here."""
    if not fixed:
        return cls

    def __init__(self, dim, **kw):
        cls.__init__(self, dim, **{**kw, **fixed})

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})
