"""MOTChallenge text formats: reading, validation and writing.

Layout of one sequence (MOT17, MOT20, DanceTrack and our synthetic set all use it)::

    <seq>/seqinfo.ini        [Sequence] name, imDir, frameRate, seqLength, imWidth, imHeight, imExt
    <seq>/img1/000001.jpg    one image per frame, 1-based, 6 digits
    <seq>/gt/gt.txt          frame,id,x,y,w,h,conf,class,visibility          (9 columns)
    <seq>/det/det.txt        frame,-1,x,y,w,h,score[,x3d,y3d,z3d]            (7-10 columns, optional)

Result files written by trackers (one per sequence) use ``frame,id,x,y,w,h,score,-1,-1,-1``.

Column 7 means different things: in ``gt.txt`` it is the *consider* flag (1 = evaluate this row, 0 = ignore
it; MOT17 marks e.g. heavily occluded static people 0), in ``det.txt`` and result files it is a
confidence score.

Every reader returns a :class:`MOTRows`: an ``(N, 9)`` float64 array in the canonical gt column order
``frame, id, x, y, w, h, conf, class, visibility`` (``class``/``visibility`` are -1 where the file has
none) and the 1-based line number of each row, so later checks (missing image, duplicate id) can still
name the line.
Every problem raises :class:`MOTFormatError` whose message starts with ``<file>:<line>:``; its ``kind`` (e.g.
"bad row", "invalid box") is the category the pre-flight check (:mod:`ddetr_video.validation`) reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

__all__ = [
    "COLUMNS",
    "MOTFormatError",
    "MOTFormat",
    "MOT_FORMATS",
    "MOTRows",
    "SeqInfo",
    "MOTSequence",
    "get_format",
    "read_seqinfo",
    "write_seqinfo",
    "read_mot_file",
    "write_gt_file",
    "write_results_file",
    "load_sequence",
    "list_sequences",
    "is_sequence_dir",
    "image_path",
]

COLUMNS = ("frame", "id", "x", "y", "w", "h", "conf", "class", "visibility")
FRAME, ID, X, Y, W, H, CONF, CLASS, VIS = range(9)


class MOTFormatError(ValueError):
    """A malformed MOTChallenge file; ``path`` and ``line`` (1-based, or None) name the culprit, ``kind`` is a
    short category ("bad row", "invalid box", "bad frame", "bad id", "duplicate id", "unknown class", ...)."""

    def __init__(self, path: str, line: int | None, message: str, kind: str = "bad row"):
        self.path = str(path)
        self.line = line
        self.reason = message
        self.kind = kind
        super().__init__(f"{self.where}: {message}")

    @property
    def where(self) -> str:
        """``path:line``, or ``path`` when the problem is the whole file."""
        return f"{self.path}:{self.line}" if self.line is not None else self.path


@dataclass(frozen=True)
class MOTFormat:
    """Per-benchmark semantics of the gt ``class`` column.

    classes:            every class id that may legally appear in gt.txt -> name.
    eval_classes:       the classes that are tracking targets (the others are only used for preprocessing).
    distractor_classes: predictions matched (IoU >= 0.5) to these gt rows are dropped, neither TP nor FP
                        (TrackEval's MOTChallenge preprocessing).
    """

    name: str
    classes: Dict[int, str]
    eval_classes: Tuple[int, ...]
    distractor_classes: Tuple[int, ...] = ()
    gt_columns: Tuple[int, ...] = (9,)


_MOT_CLASSES = {
    1: "pedestrian",
    2: "person_on_vehicle",
    3: "car",
    4: "bicycle",
    5: "motorbike",
    6: "non_mot_vehicle",
    7: "static_person",
    8: "distractor",
    9: "occluder",
    10: "occluder_on_ground",
    11: "occluder_full",
    12: "reflection",
    13: "crowd",
}

SYNTHETIC_CLASSES = {1: "square", 2: "circle", 3: "triangle"}

MOT_FORMATS: Dict[str, MOTFormat] = {
    "mot17": MOTFormat("mot17", _MOT_CLASSES, (1,), (2, 7, 8, 12)),
    "mot16": MOTFormat("mot16", _MOT_CLASSES, (1,), (2, 7, 8, 12)),
    "mot20": MOTFormat("mot20", _MOT_CLASSES, (1,), (2, 6, 7, 8, 12)),
    # DanceTrack gt rows are "frame,id,x,y,w,h,1,1,1": a single class, always considered, visibility 1.
    "dancetrack": MOTFormat("dancetrack", {1: "dancer"}, (1,)),
    "synthetic": MOTFormat("synthetic", SYNTHETIC_CLASSES, (1, 2, 3)),
}


def get_format(fmt) -> MOTFormat:
    if isinstance(fmt, MOTFormat):
        return fmt
    key = str(fmt).lower()
    if key not in MOT_FORMATS:
        raise KeyError(f"unknown MOT format {fmt!r}; known: {sorted(MOT_FORMATS)}")
    return MOT_FORMATS[key]


@dataclass
class MOTRows:
    """Rows of a MOT text file. ``data``: (N, 9) float64 in :data:`COLUMNS` order; ``lines``: (N,) int64."""

    path: str
    data: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def select(self, mask: np.ndarray) -> MOTRows:
        return MOTRows(self.path, self.data[mask], self.lines[mask])

    def frame(self, f: int) -> np.ndarray:
        """(M, 9) rows of frame ``f`` (1-based)."""
        return self.data[self.data[:, FRAME] == f]


# ----------------------------------------------------------------------------------------------------
# seqinfo.ini
# ----------------------------------------------------------------------------------------------------
_SEQINFO_INT = ("frameRate", "seqLength", "imWidth", "imHeight")
_SEQINFO_BAD = "bad seqinfo"
_SEQINFO_KEYS = ("name", "imDir", "frameRate", "seqLength", "imWidth", "imHeight", "imExt")


@dataclass
class SeqInfo:
    name: str
    im_dir: str
    frame_rate: int
    seq_length: int
    width: int
    height: int
    im_ext: str
    path: str = ""
    key_lines: Dict[str, int] = field(default_factory=dict)  # key -> line number in the .ini (for messages)


def read_seqinfo(path: str) -> SeqInfo:
    """Parse ``seqinfo.ini``; every key of the ``[Sequence]`` section is required."""
    if not os.path.isfile(path):
        raise MOTFormatError(
            path,
            None,
            f"not found: sequence folder {os.path.dirname(path)} has no seqinfo.ini",
            "missing seqinfo",
        )
    values: Dict[str, str] = {}
    lines: Dict[str, int] = {}
    section = None
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            s = raw.strip()
            if not s or s[0] in "#;":
                continue
            if s.startswith("["):
                if not s.endswith("]"):
                    raise MOTFormatError(path, lineno, f"bad section header {s!r}", _SEQINFO_BAD)
                section = s[1:-1].strip()
                continue
            if "=" not in s:
                raise MOTFormatError(path, lineno, f"expected 'key=value', got {s!r}", _SEQINFO_BAD)
            if section != "Sequence":
                continue
            k, v = (t.strip() for t in s.split("=", 1))
            values[k] = v
            lines[k] = lineno
    missing = [k for k in _SEQINFO_KEYS if k not in values]
    if missing:
        raise MOTFormatError(path, None, f"[Sequence] section lacks key(s) {missing}", _SEQINFO_BAD)
    ints = {}
    for k in _SEQINFO_INT:
        try:
            ints[k] = int(values[k])
        except ValueError:
            raise MOTFormatError(
                path, lines[k], f"{k}={values[k]!r} is not an integer", _SEQINFO_BAD
            ) from None
        if ints[k] <= 0:
            raise MOTFormatError(path, lines[k], f"{k}={ints[k]} must be positive", _SEQINFO_BAD)
    ext = values["imExt"]
    if not ext.startswith("."):
        raise MOTFormatError(path, lines["imExt"], f"imExt={ext!r} must start with '.'", _SEQINFO_BAD)
    return SeqInfo(
        name=values["name"],
        im_dir=values["imDir"],
        frame_rate=ints["frameRate"],
        seq_length=ints["seqLength"],
        width=ints["imWidth"],
        height=ints["imHeight"],
        im_ext=ext,
        path=path,
        key_lines=lines,
    )


def write_seqinfo(path: str, info: SeqInfo) -> None:
    text = (
        "[Sequence]\n"
        f"name={info.name}\nimDir={info.im_dir}\nframeRate={info.frame_rate}\nseqLength={info.seq_length}\n"
        f"imWidth={info.width}\nimHeight={info.height}\nimExt={info.im_ext}\n"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------------
# gt / det / result text files
# ----------------------------------------------------------------------------------------------------
_KIND_COLUMNS = {"gt": (9,), "det": (7, 8, 9, 10), "result": (6, 7, 8, 9, 10)}


def read_mot_file(
    path: str,
    kind: str = "gt",
    fmt="mot17",
    *,
    seq_length: int | None = None,
    allow_empty: bool = True,
    errors: List[MOTFormatError] | None = None,
) -> MOTRows:
    """Read and validate a MOT text file.

    kind: "gt" (9 columns; id > 0, class in ``fmt.classes``, conf flag in {0, 1}, visibility in [0, 1],
    unique (frame, id)), "det" (7-10 columns, column 7 = score) or "result" (6-10 columns, id >= 0,
    unique (frame, id)). Always checked: numeric finite values, integer frame >= 1 (<= ``seq_length`` if
    given), integer id, w >= 0, h >= 0.

    errors: None raises the first :class:`MOTFormatError`; a list collects every one instead (a bad row is
    skipped, the good rows are returned): the pre-flight check reports all problems with this same parser.
    """
    if kind not in _KIND_COLUMNS:
        raise ValueError(f"kind must be one of {sorted(_KIND_COLUMNS)}, got {kind!r}")
    spec = get_format(fmt)
    rows: List[List[float]] = []
    lines: List[int] = []
    try:
        if not os.path.isfile(path):
            raise MOTFormatError(path, None, f"{kind} file not found", "missing file")
        seen: Dict[Tuple[int, int], int] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    row = _parse_line(path, lineno, raw, kind, spec, seq_length, seen)
                except MOTFormatError as e:
                    _collect(e, errors)
                    continue
                if row is not None:
                    rows.append(row)
                    lines.append(lineno)
        if not rows and not allow_empty:
            raise MOTFormatError(path, None, f"{kind} file has no rows", "no rows")
    except MOTFormatError as e:
        _collect(e, errors)
    data = np.asarray(rows, dtype=np.float64).reshape(-1, 9)
    return MOTRows(path, data, np.asarray(lines, dtype=np.int64))


def _collect(error: MOTFormatError, errors: List[MOTFormatError] | None) -> None:
    """Raise ``error``, or append it to ``errors`` when collecting."""
    if errors is None:
        raise error
    errors.append(error)


def _parse_line(path, lineno, raw, kind, spec: MOTFormat, seq_length, seen) -> List[float] | None:
    """One checked canonical row of a text line (None for a blank line); records (frame, id) in ``seen``."""
    s = raw.strip()
    if not s:
        return None
    parts = [p.strip() for p in s.split(",")]
    ncols_ok = spec.gt_columns if kind == "gt" else _KIND_COLUMNS[kind]
    if len(parts) not in ncols_ok:
        raise MOTFormatError(
            path,
            lineno,
            f"expected {' or '.join(map(str, ncols_ok))} comma-separated columns for a {spec.name} "
            f"{kind} file ({','.join(COLUMNS[: max(ncols_ok)])}...), got {len(parts)}",
        )
    row = _canonical_row(_numbers(path, lineno, parts), kind)
    _check_row(path, lineno, row, kind, spec, seq_length)
    if kind in ("gt", "result"):
        key = (int(row[FRAME]), int(row[ID]))
        if key in seen:
            raise MOTFormatError(
                path,
                lineno,
                f"duplicate id {key[1]} in frame {key[0]} (first on line {seen[key]})",
                "duplicate id",
            )
        seen[key] = lineno
    return row


def _numbers(path, lineno, parts: List[str]) -> List[float]:
    """The fields as finite floats (NaN/inf in a box column is an invalid box)."""
    vals = []
    for c, p in enumerate(parts):
        try:
            v = float(p)
        except ValueError:
            name = COLUMNS[c] if c < len(COLUMNS) else f"#{c + 1}"
            raise MOTFormatError(path, lineno, f"column {c + 1} ({name}) is not a number: {p!r}") from None
        if not np.isfinite(v):
            kind = "invalid box" if X <= c <= H else "bad row"
            raise MOTFormatError(path, lineno, f"column {c + 1} is not finite: {p!r}", kind)
        vals.append(v)
    return vals


def _canonical_row(vals: List[float], kind: str) -> List[float]:
    if kind == "gt":
        return vals[:9]
    # det / result: frame,id,x,y,w,h[,score[,x3d,y3d,z3d]] -> class/visibility unknown (-1)
    score = vals[6] if len(vals) > 6 else 1.0
    return vals[:6] + [score, -1.0, -1.0]


def _check_row(path, lineno, row, kind, spec: MOTFormat, seq_length):
    frame, tid = row[FRAME], row[ID]
    if frame != int(frame) or frame < 1:
        raise MOTFormatError(path, lineno, f"frame must be an integer >= 1, got {frame:g}", "bad frame")
    if seq_length is not None and frame > seq_length:
        raise MOTFormatError(
            path, lineno, f"frame {int(frame)} is beyond seqLength={seq_length}", "bad frame"
        )
    if tid != int(tid):
        raise MOTFormatError(path, lineno, f"id must be an integer, got {tid:g}", "bad id")
    if row[W] < 0 or row[H] < 0:
        raise MOTFormatError(path, lineno, f"negative box size w={row[W]:g} h={row[H]:g}", "invalid box")
    if kind == "gt":
        _check_gt_row(path, lineno, row, spec)
    elif kind == "result" and tid < 0:
        raise MOTFormatError(path, lineno, f"result track id must be >= 0, got {int(tid)}", "bad id")


def _check_gt_row(path, lineno, row, spec: MOTFormat):
    """gt-only checks: positive id, known class, consider flag 0/1, visibility in [0, 1]."""
    if row[ID] <= 0:
        raise MOTFormatError(
            path, lineno, f"gt track id must be a positive integer, got {int(row[ID])}", "bad id"
        )
    cls = row[CLASS]
    if cls != int(cls) or int(cls) not in spec.classes:
        raise MOTFormatError(
            path,
            lineno,
            f"unknown class id {cls:g} for format {spec.name} (known: {sorted(spec.classes)})",
            "unknown class",
        )
    if row[CONF] not in (0.0, 1.0):
        raise MOTFormatError(
            path, lineno, f"gt consider flag (column 7) must be 0 or 1, got {row[CONF]:g}", "bad flag"
        )
    if not 0.0 <= row[VIS] <= 1.0:
        raise MOTFormatError(
            path, lineno, f"visibility must be in [0, 1], got {row[VIS]:g}", "bad visibility"
        )


def write_gt_file(path: str, data: np.ndarray) -> None:
    """Write (N, 9) gt rows ``frame,id,x,y,w,h,conf,class,visibility`` sorted by (frame, id)."""
    data = np.asarray(data, dtype=np.float64).reshape(-1, 9)
    order = np.lexsort((data[:, ID], data[:, FRAME]))
    with open(path, "w", encoding="utf-8") as f:
        for r in data[order]:
            f.write(
                f"{int(r[0])},{int(r[1])},{r[2]:.2f},{r[3]:.2f},{r[4]:.2f},{r[5]:.2f},"
                f"{int(r[6])},{int(r[7])},{r[8]:.4f}\n"
            )


def write_results_file(path: str, data: np.ndarray) -> None:
    """Write tracker results. ``data``: (N, >=7) rows ``frame, id, x, y, w, h, score``, sorted by frame."""
    data = np.asarray(data, dtype=np.float64)
    data = data.reshape(-1, data.shape[-1] if data.size else 7)
    order = np.lexsort((data[:, ID], data[:, FRAME]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in data[order]:
            f.write(
                f"{int(r[0])},{int(r[1])},{r[2]:.2f},{r[3]:.2f},{r[4]:.2f},{r[5]:.2f},{r[6]:.4f},-1,-1,-1\n"
            )


# ----------------------------------------------------------------------------------------------------
# whole sequences
# ----------------------------------------------------------------------------------------------------
@dataclass
class MOTSequence:
    """One validated sequence: ``info`` (seqinfo.ini), ``gt`` (None for test splits without gt), ``det``."""

    root: str
    info: SeqInfo
    gt: MOTRows | None
    det: MOTRows | None = None

    @property
    def name(self) -> str:
        return self.info.name

    def image_path(self, frame: int) -> str:
        return image_path(self.root, self.info, frame)


def image_path(seq_dir: str, info: SeqInfo, frame: int) -> str:
    return os.path.join(seq_dir, info.im_dir, f"{int(frame):06d}{info.im_ext}")


def load_sequence(
    seq_dir: str, fmt="mot17", *, require_gt: bool = True, check_images: bool = True, load_det: bool = False
) -> MOTSequence:
    """Read and cross-check one sequence directory.

    Checks (besides the per-row checks of :func:`read_mot_file`): the image folder holds exactly ``seqLength``
    files named ``000001<imExt>..`` (else the error names seqinfo.ini and its seqLength line), and every gt
    frame has its image (else the error names gt.txt and the first row of that frame).
    """
    info = read_seqinfo(os.path.join(seq_dir, "seqinfo.ini"))
    gt_path = os.path.join(seq_dir, "gt", "gt.txt")
    gt = None
    if os.path.isfile(gt_path):
        gt = read_mot_file(gt_path, "gt", fmt, seq_length=info.seq_length)
    elif require_gt:
        raise MOTFormatError(
            gt_path, None, "gt file not found (pass require_gt=False for test splits)", "missing annotations"
        )
    det = None
    det_path = os.path.join(seq_dir, "det", "det.txt")
    if load_det and os.path.isfile(det_path):
        det = read_mot_file(det_path, "det", fmt, seq_length=info.seq_length)
    if check_images:
        _check_images(seq_dir, info, gt)
    return MOTSequence(seq_dir, info, gt, det)


def _check_images(seq_dir: str, info: SeqInfo, gt: MOTRows | None) -> None:
    im_dir = os.path.join(seq_dir, info.im_dir)
    if not os.path.isdir(im_dir):
        raise MOTFormatError(
            info.path, info.key_lines.get("imDir"), f"image folder {im_dir} does not exist", "missing image"
        )
    present = {n for n in os.listdir(im_dir) if n.endswith(info.im_ext)}
    if gt is not None and len(gt):
        frames, first = np.unique(gt.data[:, FRAME].astype(np.int64), return_index=True)
        for fr, idx in zip(frames, first):
            if f"{int(fr):06d}{info.im_ext}" not in present:
                raise MOTFormatError(
                    gt.path,
                    int(gt.lines[idx]),
                    f"frame {int(fr)} has gt rows but image "
                    f"{os.path.join(im_dir, f'{int(fr):06d}{info.im_ext}')}"
                    " is missing",
                    "missing image",
                )
    expected = {f"{i:06d}{info.im_ext}" for i in range(1, info.seq_length + 1)}
    if present != expected:
        missing = sorted(expected - present)
        extra = sorted(present - expected)
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if extra:
            detail.append(f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        raise MOTFormatError(
            info.path,
            info.key_lines.get("seqLength"),
            f"seqLength={info.seq_length} but {im_dir} holds {len(present)} '{info.im_ext}' files "
            f"({'; '.join(detail)})",
            "image count",
        )


def list_sequences(split_dir: str, sequences: Iterable[str] | None = None) -> List[str]:
    """Sorted sequence folder names under ``split_dir``, optionally filtered. A sequence folder holds a
    seqinfo.ini, an ``img1/`` or a ``gt/`` (one without seqinfo.ini is listed: loading it names the missing
    file instead of silently training on fewer sequences)."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"MOT split folder {split_dir} does not exist")
    names = sorted(n for n in os.listdir(split_dir) if is_sequence_dir(os.path.join(split_dir, n)))
    if sequences is not None:
        wanted: Sequence[str] = list(sequences)
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise FileNotFoundError(f"sequences {unknown} not found in {split_dir} (have {names})")
        names = [n for n in names if n in set(wanted)]
    return names


def is_sequence_dir(path: str) -> bool:
    """Whether ``path`` looks like a MOT sequence folder: it holds seqinfo.ini, ``img1/`` or ``gt/``."""
    return os.path.isfile(os.path.join(path, "seqinfo.ini")) or any(
        os.path.isdir(os.path.join(path, d)) for d in ("img1", "gt")
    )
