"""Pairs of rig faces with a ground truth: for expression transfer (SPEC.md §1) and face swap (§2).

Expression transfer: the seed trains ``G(I_s, L_s, L_t)`` on a source and a target image of the same
identity, so that ``||I_t − Î_t||₁`` has a ground truth. On the rig that is exact:
the pair shares every identity, appearance and style parameter; the target's
expression is drawn afresh and its pose moves a little (photos of one person are
never taken from exactly the same angle).

Face swap: two people, and the render of the source's identity with everything
else of the target, which is exactly what a swap should produce (:func:`swap_pairs`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from facecore.rig.schema import RigSchema


def expression_pairs(schema: RigSchema, rng: np.random.Generator, count: int, pose_jitter: float = 0.05,
                     fixed: Mapping[str, Any] | None = None, pose_still: float = 0.0
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``count`` (source, target) parameter sets of one identity each.

    Args:
        schema: the rig.
        rng: where the draws come from; the same seed gives the same pairs.
        count: pairs to draw.
        pose_jitter: the target's pose parameters are the source's moved by up to
            this much each (uniform, in the [0, 1] parameter scale, clipped).
        fixed: parameters held at a value in both faces (as :meth:`RigSchema.sample`).
        pose_still: the share of pairs (drawn per pair) whose pose does not move at all,
            as in a transfer job, whose targets keep the source's pose.

    Returns:
        (sources, targets), lists of named values as :meth:`RigSchema.sample` gives.
    """
    if count < 0 or not 0.0 <= pose_jitter <= 1.0 or not 0.0 <= pose_still <= 1.0:
        raise ValueError(f"count must be >= 0 and pose_jitter and pose_still in [0, 1], got {count}, "
                         f"{pose_jitter}, {pose_still}")
    names = schema.continuous_names
    expression = [names[i] for i in schema.indices("expression")]
    pose = [names[i] for i in schema.indices("pose")]
    fixed = dict(fixed or {})
    sources = schema.sample(rng, count, fixed)
    expressions = schema.sample(rng, count, fixed)  # exclusive pairs already resolved within each draw
    shifts = rng.uniform(-pose_jitter, pose_jitter, size=(count, len(pose)))
    if pose_still > 0:  # drawn only then, so pairs without it are the same draws as before
        shifts[rng.random(count) < pose_still] = 0.0
    targets = []
    for source, fresh, shift in zip(sources, expressions, shifts):
        target = dict(source)
        target.update({name: fresh[name] for name in expression})
        target.update({name: float(np.clip(source[name] + delta, 0.0, 1.0)) for name, delta in zip(pose, shift)
                       if name not in fixed})
        targets.append(target)
    return sources, targets


def swap_pairs(schema: RigSchema, rng: np.random.Generator, count: int, fixed: Mapping[str, Any] | None = None
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``count`` (source, target, truth) parameter sets for face swap: two people drawn apart, and
    the swap's ground truth, the target with the source's identity parameters (face, features and
    head shape) and everything else its own (expression, pose, appearance, hair, brow and beard
    styles): what ``render(identity of source, everything else of target)`` shows.

    Args:
        schema: the rig.
        rng: where the draws come from; the same seed gives the same pairs.
        count: pairs to draw.
        fixed: parameters held at a value in all three faces (as :meth:`RigSchema.sample`).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    names = schema.continuous_names
    identity = [names[i] for i in schema.indices("identity")]
    sources = schema.sample(rng, count, fixed)
    targets = schema.sample(rng, count, fixed)
    truths = [{**target, **{name: source[name] for name in identity}} for source, target in zip(sources, targets)]
    return sources, targets, truths
