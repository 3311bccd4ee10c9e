"""The avatar rig: parameter schema and procedural renderer (the stand-in game client)."""

from facecore.rig.classes import HELEN_CLASSES, colourise
from facecore.rig.render import REGIONS, Renderer, RigRender, reference_face
from facecore.rig.schema import (
    ContinuousParam,
    RigSchema,
    SchemaError,
    StyleGroup,
    default_schema,
    load_schema,
    schema_from_dict,
)

__all__ = [
    "HELEN_CLASSES",
    "REGIONS",
    "ContinuousParam",
    "Renderer",
    "RigRender",
    "RigSchema",
    "SchemaError",
    "StyleGroup",
    "colourise",
    "default_schema",
    "load_schema",
    "reference_face",
    "schema_from_dict",
]
