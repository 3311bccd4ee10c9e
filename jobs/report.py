"""``facejobs report OUTPUT``: a self-contained HTML contact sheet of a job's output.

One row per output row: the source photo (fetched from its uri when reachable),
every image column the job wrote (aligned, preview, render, image, mask...), the
status, and the parameters by name. The kinds that turn photos into avatars show
the face and its avatars side by side instead: recognize ``photo | avatar``, pinch
``photo | recognize avatar | pinch avatar`` (the photo is the aligned face the
models saw); transfer shows ``source | target landmarks | result | frame`` (the
source's landmarks in green, the target's in red, over the source); swap shows
``source | target | result | frame``. Images are
embedded as data URIs, so the file opens in a browser wherever it is copied.
"""

from __future__ import annotations

import base64
import html
import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facecore.images import DecodeLimits, ImageError, decode, decode_png, encode_jpeg
from jobs.output import OutputFolder
from jobs.spec import StorageSpec
from jobs.storage import locate, write_atomic

IMAGE_COLUMNS = ("aligned", "preview", "render", "image", "mask")
THUMBNAIL = 160
PHOTO = "photo"  # the header of the source photo, fetched from the row's uri
TARGET_MARKS = "target_marks"  # transfer: the source and target landmarks drawn over the source


def _landmark_picture(row: dict) -> np.ndarray | None:
    """The aligned source, its landmarks in green and the target's in red, twice its size."""
    if not row.get("aligned") or row.get("target_landmarks") is None:
        return None
    picture = cv2.resize(decode_png(row["aligned"]), None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    for column, colour in (("aligned_landmarks", (0, 200, 0)), ("target_landmarks", (230, 0, 0))):
        for x, y in np.asarray(row[column], np.float64).reshape(-1, 2) * 2:
            cv2.circle(picture, (int(round(x)), int(round(y))), 2, colour, -1, lineType=cv2.LINE_AA)
    return picture


def _picture_columns(kind: str, options: dict, names: list[str]) -> list[tuple[str, str]]:
    """(header, column) of each picture in a row, in order; column ``PHOTO`` is the source photo."""
    if kind == "recognize":
        return [("photo", "aligned"), ("avatar", "render")]
    if kind == "pinch":
        start = "recognize avatar" if options.get("init", "recognize") == "recognize" else "start avatar (reference)"
        return [("photo", "aligned"), (start, "init_render"), ("pinch avatar", "render")]
    if kind == "transfer":
        return [("source", "aligned"), ("target landmarks", TARGET_MARKS), ("result", "result"), ("frame", "frame")]
    if kind == "swap":
        return [("source", "source_aligned"), ("target", "aligned"), ("result", "result"), ("frame", "frame")]
    return ([(PHOTO, PHOTO)] if "uri" in names else []) + [(c, c) for c in IMAGE_COLUMNS if c in names]


def _data_uri(rgb: np.ndarray) -> str:
    scale = THUMBNAIL / max(rgb.shape[:2])
    if scale < 1:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(rgb, 85)).decode("ascii")


def _mask_picture(data: bytes) -> np.ndarray:
    from facecore.rig import colourise

    return colourise(decode_png(data))


def _photo(uri: str, storage: StorageSpec | None) -> str | None:
    try:
        location = locate(uri, storage)
        with location.fs.open(location.path, "rb") as handle:
            data = handle.read(64 * 1024 * 1024)
        return _data_uri(decode(data, DecodeLimits()).rgb)
    except (OSError, ImageError, ValueError):
        return None


REPORT_NAME = "_report.html"


def write_report(output_uri: str, storage: StorageSpec | None = None, limit: int = 200) -> str:
    """Write ``_report.html`` into the output folder; return its URI.

    The leading underscore keeps Parquet readers (pandas, Ray Data, DuckDB) from
    taking the page for a data file when they read the folder, as with ``_SUCCESS``.
    """
    folder = OutputFolder(locate(output_uri, storage))
    parts = folder.parts()
    if not parts:
        raise FileNotFoundError(f"no output parts in {output_uri}")
    arrow_fs = folder.location.arrow_fs
    metadata = pq.read_schema(parts[0], filesystem=arrow_fs).metadata or {}
    names = json.loads(metadata.get(b"facejobs.params", b"[]"))
    rig = json.loads(metadata.get(b"facejobs.rig", b"{}"))
    neutral = {p["name"]: p.get("neutral", 0.5) for p in rig.get("continuous", [])}
    kind = metadata.get(b"facejobs.kind", b"?").decode()
    options = json.loads(metadata.get(b"facejobs.options", b"{}"))
    table = pa.concat_tables(pq.read_table(p, filesystem=arrow_fs) for p in parts)
    order = [("key", "ascending")] + ([("target", "ascending")] if "target" in table.column_names else [])
    table = table.sort_by(order).slice(0, limit)
    target_names = json.loads(metadata.get(b"facejobs.target_params", b"[]"))
    pictures = _picture_columns(kind, options, table.column_names)
    rows_html = []
    for row in table.to_pylist():
        cells = []
        for _, column in pictures:
            data = row.get(column)
            if column == PHOTO or (column == "aligned" and not data and row.get("uri")):
                # The source photo; for a row that failed before alignment, in place of its face.
                picture = _photo(row["uri"], storage)
                cells.append(f'<td><img src="{picture}"></td>' if picture else "<td>(photo unavailable)</td>")
            elif column == TARGET_MARKS:
                picture = _landmark_picture(row)
                cells.append(f'<td><img src="{_data_uri(picture)}"></td>' if picture is not None else "<td></td>")
            elif data:
                picture = _mask_picture(data) if column == "mask" else decode_png(data)
                if picture.ndim == 2:
                    picture = np.repeat(picture[:, :, None], 3, axis=2)
                cells.append(f'<td><img src="{_data_uri(picture)}"></td>')
            else:
                cells.append("<td></td>")
        status = html.escape(row.get("status") or "")
        error = html.escape(row.get("error") or "")
        details = ""
        if row.get("params") is not None and names:
            # The style choices, then the ten parameters farthest from neutral.
            pairs = list(zip(names, row["params"]))
            styles = [name for name, value in pairs if "=" in name and value > 0.5]
            if row.get("style_confidence") is not None:  # one per group, in the rig's (and the vector's) order
                styles = [f"{name} ({p:.2f})" for name, p in zip(styles, row["style_confidence"])]
            continuous = sorted(((n, v) for n, v in pairs if "=" not in n),
                                key=lambda p: -abs(p[1] - neutral.get(p[0], 0.5)))
            shown = styles + [f"{n}={v:.2f}" for n, v in continuous[:10]]
            details = "<br>".join(html.escape(s) for s in shown)
        if row.get("target_params") is not None:
            # The target, its scores, and the expression parameters it sets.
            given = sorted(zip(target_names, row["target_params"]), key=lambda p: -p[1])
            scores = [f"id distance {row['id_distance']:.3f}" if row.get("id_distance") is not None else "",
                      f"landmark NME {row['landmark_nme']:.3f}" if row.get("landmark_nme") is not None
                      else "landmark NME: no face found"]
            shown = [f"target {row['target']}"] + [s for s in scores if s] + [f"{n}={v:.2f}" for n, v in given[:6]
                                                                            if v > 0.05]
            details = "<br>".join(html.escape(s) for s in shown)
        losses = ""
        if row.get("loss_end") is not None:
            losses = f"<br>loss {row['loss_start']:.4f} → {row['loss_end']:.4f} in {row['iterations']} steps"
        cells.append(f"<td><b>{html.escape(str(row['key']))}</b><br>{status} {error}{losses}"
                     f"<div class=p>{details}</div></td>")
        rows_html.append("<tr>" + "".join(cells) + "</tr>")
    header = [html.escape(name) for name, _ in pictures] + ["row"]
    document = f"""<!doctype html><meta charset="utf-8"><title>facejobs {kind} report</title>
<style>body{{font:13px sans-serif}} td{{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}}
img{{max-width:{THUMBNAIL}px}} .p{{color:#555;font-size:11px}}</style>
<h1>{html.escape(kind)} job: {html.escape(output_uri)}</h1>
<p>{table.num_rows} rows shown (first {limit} by key).</p>
<table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>{''.join(rows_html)}</table>"""
    target = folder.location.join(REPORT_NAME)
    write_atomic(target, document.encode("utf-8"))
    return target.uri
