"""Rig pairs: for expression transfer one identity, two expressions and a small pose change; for
face swap two people and the truth, the target with the source's identity."""

from __future__ import annotations

import numpy as np
import pytest

from facecore.rig import default_schema
from facecore.rig.pairs import expression_pairs, swap_pairs


def test_pairs_share_everything_but_expression_and_a_little_pose():
    schema = default_schema()
    sources, targets = expression_pairs(schema, np.random.default_rng(3), 50, pose_jitter=0.05)
    names = schema.continuous_names
    expression = {names[i] for i in schema.indices("expression")}
    pose = {names[i] for i in schema.indices("pose")}
    changed_expression = 0
    for source, target in zip(sources, targets):
        schema.encode(target)  # a valid parameter set (exclusive pairs respected)
        for name, value in source.items():
            if name in expression:
                changed_expression += value != target[name]
            elif name in pose:
                assert abs(value - target[name]) <= 0.05 + 1e-12
            else:
                assert value == target[name], name
    assert changed_expression > 0.9 * 50 * len(expression) * 0.5  # fresh draws, not copies
    again = expression_pairs(schema, np.random.default_rng(3), 50, pose_jitter=0.05)
    assert again == (sources, targets)
    with pytest.raises(ValueError, match="pose_jitter"):
        expression_pairs(schema, np.random.default_rng(0), 1, pose_jitter=2.0)


def test_a_share_of_pairs_keeps_its_pose_still():
    schema = default_schema()
    pose = [schema.continuous_names[i] for i in schema.indices("pose")]
    sources, targets = expression_pairs(schema, np.random.default_rng(5), 400, pose_jitter=0.05, pose_still=0.5)
    still = [all(source[name] == target[name] for name in pose) for source, target in zip(sources, targets)]
    assert 0.4 < np.mean(still) < 0.6
    moving = expression_pairs(schema, np.random.default_rng(5), 400, pose_jitter=0.05)
    assert moving[0] == sources  # the same people: the draw of who stays still comes last
    with pytest.raises(ValueError, match="pose_still"):
        expression_pairs(schema, np.random.default_rng(0), 1, pose_still=1.5)


def test_aligned_pairs_render_one_face_with_two_expressions():
    from jobs.samples import aligned_expression_pairs

    (source, source_points, source_vectors), (target, target_points, target_vectors) = \
        aligned_expression_pairs(6, seed=1, size=64)
    assert source.shape == target.shape == (6, 64, 64, 3)
    assert source_points.shape == target_points.shape == (6, 68, 2)
    schema = default_schema()
    appearance = schema.indices("appearance")
    assert np.array_equal(source_vectors[:, appearance], target_vectors[:, appearance])
    # the expression moved (mouths apart) but the person did not: the nose (no action
    # unit moves it) is nearer its own pair's than another identity's
    mouth = np.linalg.norm(source_points[:, 48:68] - target_points[:, 48:68], axis=2).mean()
    own = np.linalg.norm(source_points[:, 27:36] - target_points[:, 27:36], axis=2).mean()
    other = np.linalg.norm(source_points[:, 27:36] - np.roll(target_points, 1, axis=0)[:, 27:36], axis=2).mean()
    assert mouth > 0.5 and own < 0.5 * other, (mouth, own, other)


def test_swap_truth_has_the_sources_identity_and_everything_else_of_the_target():
    schema = default_schema()
    sources, targets, truths = swap_pairs(schema, np.random.default_rng(4), 20)
    names = schema.continuous_names
    identity = {names[i] for i in schema.indices("identity")}
    differs = 0
    for source, target, truth in zip(sources, targets, truths):
        schema.encode(truth)  # a valid parameter set
        assert set(truth) == set(target)
        for name, value in truth.items():
            assert value == (source[name] if name in identity else target[name]), name
        differs += sum(source[name] != target[name] for name in identity)
    assert differs > 0.9 * 20 * len(identity)  # two people, not one
    assert swap_pairs(schema, np.random.default_rng(4), 20) == (sources, targets, truths)
    with pytest.raises(ValueError, match="count"):
        swap_pairs(schema, np.random.default_rng(0), -1)
