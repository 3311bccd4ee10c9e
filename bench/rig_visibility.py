"""How visible is each continuous rig parameter?

For every continuous parameter, others at the reference face: render it at 0.25
and at 0.75 and report how far the 68 landmarks move (largest, in pixels) and
how much the image changes (mean |difference| over every pixel and channel, in
0-255 levels), at 128 px and at 64 px (the size the shipped imitator and parser
see). A parameter counts as visible at a size if it moves a landmark by at least
``--min-landmark-px`` or changes the image by at least ``--min-pixel-change``.
For each discrete style group: the two choices that look most alike (others at
the reference face) and how much the image changes between them at 128 px.

    python bench/rig_visibility.py [--min-landmark-px 0.5] [--min-pixel-change 0.1] [--table]

    RESULT visible_128=N/76 visible_64=N/76 invisible_128=name,... invisible_64=name,... closest_styles=...
"""

from __future__ import annotations

import argparse

import numpy as np

from facecore.rig import Renderer, default_schema


def visibility(size: int) -> list[tuple[str, str, float, float]]:
    """(name, group, largest landmark move in px, mean |image change|) per continuous parameter."""
    schema = default_schema()
    renderer = Renderer(schema)
    rows = []
    for param in schema.continuous:
        low, high = renderer.render({param.name: 0.25}, size), renderer.render({param.name: 0.75}, size)
        moved = float(np.linalg.norm(low.landmarks - high.landmarks, axis=1).max())
        changed = float(np.abs(low.image.astype(np.float64) - high.image.astype(np.float64)).mean())
        rows.append((param.name, param.group, moved, changed))
    return rows


def closest_choices(size: int) -> list[tuple[str, str, str, float]]:
    """(group, choice, choice, mean |image change|) for the two most alike choices of each style group."""
    schema = default_schema()
    renderer = Renderer(schema)
    rows = []
    for group in schema.discrete:
        images = {choice: renderer.render({group.name: choice}, size).image.astype(np.float64)
                  for choice in group.choices}
        rows.append(min(((group.name, a, b, float(np.abs(images[a] - images[b]).mean()))
                         for i, a in enumerate(group.choices) for b in group.choices[i + 1:]), key=lambda r: r[3]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-landmark-px", type=float, default=0.5)
    parser.add_argument("--min-pixel-change", type=float, default=0.1)
    parser.add_argument("--table", action="store_true", help="print every parameter (markdown)")
    args = parser.parse_args()
    results, invisible = {}, {}
    for size in (128, 64):
        results[size] = visibility(size)
        invisible[size] = [name for name, _, moved, changed in results[size]
                           if moved < args.min_landmark_px and changed < args.min_pixel_change]
    if args.table:
        print("| parameter | group | landmarks @128 (px) | image @128 | landmarks @64 (px) | image @64 |")
        print("|---|---|---|---|---|---|")
        for (name, group, moved, changed), (_, _, moved64, changed64) in zip(results[128], results[64]):
            print(f"| {name} | {group} | {moved:.2f} | {changed:.3f} | {moved64:.2f} | {changed64:.3f} |")
    closest = closest_choices(128)
    for group, a, b, changed in closest:
        print(f"style group {group}: closest choices {a} / {b}, image change {changed:.3f} at 128 px")
    total = len(results[128])
    marked = sorted(p.name for p in default_schema().continuous if not p.visible)
    if marked != sorted(invisible[128]):
        print(f"WARNING: the schema marks {marked} visible: false; measured invisible at 128 px: "
              f"{sorted(invisible[128])}")
    print(f"RESULT visible_128={total - len(invisible[128])}/{total} visible_64={total - len(invisible[64])}/{total} "
          f"invisible_128={','.join(invisible[128]) or '-'} invisible_64={','.join(invisible[64]) or '-'} "
          f"schema_marks_agree={marked == sorted(invisible[128])} "
          f"closest_styles={','.join(f'{group}:{changed:.2f}' for group, _, _, changed in closest)}")


if __name__ == "__main__":
    main()
