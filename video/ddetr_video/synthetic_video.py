"""Synthetic multi-object tracking videos in MOTChallenge layout.

Each sequence shows flat-coloured shapes (square / circle / triangle = MOT classes 1 / 2 / 3) moving over a
fixed textured background. Every sequence contains, by construction:

* a **look-alike crossing pair**: two objects with the same shape, colour and size that cross each other at
  different depths, so the far one is (almost) fully **occluded** for a few frames and the identities can
  only be kept by motion, not appearance;
* an **entry** (an object that comes in through the left edge after frame 1) and an **exit** (an object that
  leaves through the right edge before the last frame);
* a **speed change** for every object (velocity scaled by 0.3-2.5x and turned by up to 30 degrees once);
* further random objects (entering from any edge or starting inside).

Harder variants (all off by default; :data:`ddetr_video.datasets.SYNTHETIC_HARD_CONFIG` turns them on):
``extra_crossings`` more look-alike crossing pairs (each adds 2 identities), ``occlusion_frames``: every
look-alike pair moves together for that many frames where it meets (the far one stays hidden: a longer
occlusion), ``camera_motion``: a camera-like global pan (a smooth random path, at most that many px/frame)
that moves the background and every object together.

Ground truth is measured on the rendered pixels: the box is the tight pixel extent of the object's shape
inside the image (so it is clipped at the border), ``visibility`` = (pixels of the object not covered by
nearer objects) / (pixels of the object inside the image). Rows exist for every frame in which at least
``min_pixels`` of the object are inside the image (also while fully occluded: visibility 0, as in MOT17);
the consider flag is always 1.

Output per sequence: ``<root>/<split>/<name>/{seqinfo.ini, img1/000001.jpg.., gt/gt.txt}``.
Deterministic: the same (config, seed) gives byte-identical files.

Rendering runs a Numba kernel (:mod:`ddetr_video.rasterize`) when numba imports, else the NumPy path.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, List, Tuple

import numpy as np

from ddetr_d2.errors import ConfigError

from .mot_format import SYNTHETIC_CLASSES, SeqInfo, write_gt_file, write_seqinfo
from .rasterize import render_objects

__all__ = [
    "CLASS_NAMES",
    "PALETTE",
    "SyntheticVideoConfig",
    "ObjectTrack",
    "SyntheticVideo",
    "write_sequence",
    "generate_split",
    "generate_dataset",
]

CLASS_NAMES: Tuple[str, ...] = tuple(SYNTHETIC_CLASSES[i] for i in sorted(SYNTHETIC_CLASSES))
SQUARE, CIRCLE, TRIANGLE = 0, 1, 2
PALETTE = np.array(
    [[230, 60, 60], [60, 200, 60], [70, 90, 240], [240, 200, 40], [200, 70, 220]], dtype=np.uint8
)


@dataclass(frozen=True)
class SyntheticVideoConfig:
    num_frames: int = 32
    width: int = 224
    height: int = 160
    num_objects: int = 6  # total identities per sequence (>= 4: the scripted pair, entry, exit)
    min_size: int = 18
    max_size: int = 40
    frame_rate: int = 10
    min_pixels: int = 8  # an object needs this many pixels inside the image to get a gt row
    jpeg_quality: int = 95
    # harder variants (defaults: off; a set made before they existed keeps its recipe, see _recipe_config)
    extra_crossings: int = 0  # more look-alike crossing pairs (2 identities each, on top of num_objects)
    occlusion_frames: int = 0  # look-alike pairs move together this many frames at their meeting point
    camera_motion: float = 0.0  # max speed (px/frame) of a global camera pan; 0: static camera

    def __post_init__(self):
        if self.num_objects < 4:
            raise ConfigError(
                f"num_objects must be >= 4 (scripted crossing pair, entry, exit), got {self.num_objects}"
            )
        if self.num_frames < 8:
            raise ConfigError(f"num_frames must be >= 8, got {self.num_frames}")
        if not 4 <= self.min_size <= self.max_size < min(self.width, self.height) // 2:
            raise ConfigError(
                f"need 4 <= min_size <= max_size < min(width, height) / 2, "
                f"got {self.min_size}, {self.max_size}"
            )
        if self.extra_crossings < 0 or self.occlusion_frames < 0 or self.camera_motion < 0:
            raise ConfigError(
                "extra_crossings, occlusion_frames and camera_motion must be >= 0, got "
                f"{self.extra_crossings}, {self.occlusion_frames}, {self.camera_motion}"
            )


@dataclass
class ObjectTrack:
    """One identity. ``centres``: (T, 2) float64 box centres per frame (row t = frame - 1), NaN if absent."""

    track_id: int  # 1-based MOT id
    shape: int  # 0 square, 1 circle, 2 triangle (MOT class = shape + 1)
    colour: Tuple[int, int, int]  # RGB
    w: float
    h: float
    depth: float  # larger = farther; nearer objects are drawn over farther ones
    centres: np.ndarray
    role: str = "random"  # "crossing", "entry", "exit" or "random"


class SyntheticVideo:
    """Plans the trajectories of one sequence from ``seed``; :meth:`render` draws a frame on demand."""

    def __init__(self, cfg: SyntheticVideoConfig = SyntheticVideoConfig(), seed: int = 0):
        self.cfg = cfg
        self.seed = int(seed)
        rng = np.random.default_rng(np.random.SeedSequence([0x5EED, self.seed]))
        self.camera = None  # (T, 2) int camera offsets (x, y) in px, or None (static camera)
        if cfg.camera_motion > 0:
            self.camera = _camera_path(cfg, rng)
            m = int(np.abs(self.camera).max()) + 1
            self.margin = m
            big = replace(cfg, width=cfg.width + 2 * m, height=cfg.height + 2 * m, camera_motion=0.0)
            self.background = _background(big, rng)
        else:
            self.background = _background(cfg, rng)
        self.tracks: List[ObjectTrack] = _plan_tracks(cfg, rng, self.camera)
        self._gt: np.ndarray | None = None

    # -- rendering -------------------------------------------------------------------------------------------
    def boxes_at(self, frame: int) -> Tuple[np.ndarray, List[ObjectTrack]]:
        """(K, 4) float XYWH shape boxes (unclipped) of the objects alive at ``frame`` (1-based), far first"""
        t = frame - 1
        alive = [tr for tr in self.tracks if not np.isnan(tr.centres[t, 0])]
        alive.sort(key=lambda tr: (-tr.depth, tr.track_id))
        boxes = np.array(
            [[tr.centres[t, 0] - tr.w / 2, tr.centres[t, 1] - tr.h / 2, tr.w, tr.h] for tr in alive],
            dtype=np.float64,
        ).reshape(-1, 4)
        return boxes, alive

    def render(self, frame: int, backend: str = "auto"):
        """Draw frame ``frame`` (1-based).

        Returns ``image`` (H, W, 3) uint8 RGB, ``labels`` (H, W) int32 holding the *track id* that owns each
        pixel (0 = background) and ``rows`` (M, 9) float64 gt rows in MOT column order for this frame.
        """
        cfg = self.cfg
        boxes, alive = self.boxes_at(frame)
        if self.camera is None:
            image = self.background.copy()
        else:
            ox, oy = (int(v) + self.margin for v in self.camera[frame - 1])
            image = self.background[oy : oy + cfg.height, ox : ox + cfg.width].copy()
        slot = np.full((cfg.height, cfg.width), -1, dtype=np.int32)
        shapes = np.array([tr.shape for tr in alive], dtype=np.int64)
        colours = np.array([tr.colour for tr in alive], dtype=np.uint8).reshape(-1, 3)
        extents, areas = render_objects(image, slot, boxes, shapes, colours, backend=backend)
        visible = np.bincount(slot[slot >= 0].ravel(), minlength=len(alive))
        ids = np.array([0] + [tr.track_id for tr in alive], dtype=np.int32)
        labels = ids[slot + 1]
        rows = []
        for k, tr in enumerate(alive):
            if areas[k] < cfg.min_pixels:
                continue
            x0, y0, x1, y1 = extents[k]
            vis = visible[k] / areas[k]
            rows.append([frame, tr.track_id, x0, y0, x1 - x0 + 1, y1 - y0 + 1, 1, tr.shape + 1, vis])
        rows = np.array(rows, dtype=np.float64).reshape(-1, 9)
        return image, labels, rows[np.argsort(rows[:, 1], kind="stable")]

    def gt(self) -> np.ndarray:
        """(N, 9) gt rows of the whole sequence (rendered once, then cached)."""
        if self._gt is None:
            self._gt = np.concatenate([self.render(f)[2] for f in range(1, self.cfg.num_frames + 1)], axis=0)
        return self._gt


# ----------------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------------
def _background(cfg: SyntheticVideoConfig, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0 : cfg.height, 0 : cfg.width].astype(np.float32)
    base = rng.uniform(70, 150, size=3).astype(np.float32)
    tilt = rng.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    img = (
        base[None, None, :]
        + (xx / cfg.width)[..., None] * tilt[0][None, None, :]
        + (yy / cfg.height)[..., None] * tilt[1][None, None, :]
    )
    # blocky texture (8x8 cells) + fine noise, both static over the sequence
    cells = rng.normal(0, 10, size=(cfg.height // 8 + 1, cfg.width // 8 + 1, 1)).astype(np.float32)
    img += np.repeat(np.repeat(cells, 8, 0), 8, 1)[: cfg.height, : cfg.width]
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _integrate(start_pos, vel, start_frame, num_frames, change_frame, factor, turn) -> np.ndarray:
    """Centres (T, 2) of a constant-velocity path with one speed/direction change; NaN before the start."""
    c = np.full((num_frames, 2), np.nan)
    p = np.array(start_pos, dtype=np.float64)
    v = np.array(vel, dtype=np.float64)
    rot = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    for t in range(start_frame - 1, num_frames):
        if t == change_frame - 1:
            v = factor * (rot @ v)
        c[t] = p
        p = p + v
    return c


def _cut_after_exit(c: np.ndarray, w: float, h: float, cfg: SyntheticVideoConfig) -> np.ndarray:
    """Once an object has been in the image and then fully left it, it is gone for good (NaN afterwards)."""
    inside = (
        (c[:, 0] + w / 2 > 0)
        & (c[:, 0] - w / 2 < cfg.width)
        & (c[:, 1] + h / 2 > 0)
        & (c[:, 1] - h / 2 < cfg.height)
    )
    seen = False
    for t in range(len(c)):
        if np.isnan(c[t, 0]):
            continue
        if inside[t]:
            seen = True
        elif seen:
            c[t:] = np.nan
            break
    return c


def _camera_path(cfg: SyntheticVideoConfig, rng: np.random.Generator) -> np.ndarray:
    """(T, 2) integer camera offsets: a smooth random walk of the velocity, speed <= camera_motion."""
    v = rng.normal(size=2)
    v = v / max(np.linalg.norm(v), 1e-9) * cfg.camera_motion * rng.uniform(0.3, 1.0)
    pos, out = np.zeros(2), np.zeros((cfg.num_frames, 2))
    for t in range(1, cfg.num_frames):
        v = v + rng.normal(0, 0.3 * cfg.camera_motion, size=2)
        speed = np.linalg.norm(v)
        if speed > cfg.camera_motion:
            v = v * cfg.camera_motion / speed
        pos = pos + v
        out[t] = pos
    return np.round(out).astype(np.int64)


def _hold_pair(c: np.ndarray, meet: int, frames: int, vy: float) -> np.ndarray:
    """A look-alike pair's path held at its meeting point for ``frames`` frames (drifting by ``vy``), the rest
    of the path delayed by as many frames."""
    if frames <= 0:
        return c
    i = meet - 1
    out = c.copy()
    out[i : i + frames] = c[i] + np.outer(np.arange(frames), [0.0, vy])
    out[i + frames :] = c[i : len(c) - frames] + [0.0, vy * frames]
    return out


def _extra_crossing_pair(cfg, rng, first_id, depth):
    """Two look-alike objects (same shape, colour, size) at one height meeting at a random frame, the far one
    (``depth + 1``) passing behind the near one."""
    T, W, H = cfg.num_frames, cfg.width, cfg.height
    shape = int(rng.integers(0, 3))
    colour = _colour(rng)
    s = float(rng.integers(cfg.min_size, cfg.max_size + 1))
    y = rng.uniform(0.2, 0.8) * H
    meet = int(rng.integers(max(3, T // 4), max(4, 3 * T // 4)))
    sp = rng.uniform(1.5, 3.5)
    x0 = rng.uniform(0.3, 0.7) * W
    vy = rng.uniform(-0.3, 0.3)
    pair = []
    for k, vx in enumerate((sp, -sp)):
        start = (x0 - vx * (meet - 1), y + (k - 0.5) - vy * (meet - 1))
        c = _integrate(start, (vx, vy), 1, T, T + 1, 1.0, 0.0)
        c = _hold_pair(c, meet, cfg.occlusion_frames, vy)
        pair.append(ObjectTrack(first_id + k, shape, colour, s, s, depth + k, c, "crossing"))
    return pair


def _plan_tracks(
    cfg: SyntheticVideoConfig, rng: np.random.Generator, camera: np.ndarray | None = None
) -> List[ObjectTrack]:
    T, W, H = cfg.num_frames, cfg.width, cfg.height
    tracks: List[ObjectTrack] = []
    depths = rng.permutation(cfg.num_objects).astype(np.float64)

    def size():
        return float(rng.integers(cfg.min_size, cfg.max_size + 1)), float(
            rng.integers(cfg.min_size, cfg.max_size + 1)
        )

    def speed_change(start):
        lo = min(start + 2, T)
        return int(rng.integers(lo, T + 1)), float(rng.uniform(0.3, 2.5)), float(rng.uniform(-0.5, 0.5))

    # 1-2: look-alike crossing pair (same shape, colour, size) at nearly the same height, meeting mid-video.
    shape = int(rng.integers(0, 3))
    colour = tuple(int(x) for x in PALETTE[rng.integers(0, len(PALETTE))])
    s = float(rng.integers((cfg.min_size + cfg.max_size) // 2, cfg.max_size + 1))
    y = H / 2 + rng.uniform(-0.1, 0.1) * H
    meet = T // 2
    x_left, x_right = 0.15 * W + s / 2, 0.85 * W - s / 2
    speed = (x_right - x_left) / 2 / (meet - 1)
    vy = rng.uniform(-0.3, 0.3)  # shared drift: at frame ``meet`` the pair is 1 px apart, the far one hidden
    for k, (x, vx) in enumerate([(x_left, speed), (x_right, -speed)]):
        # the speed change comes after the crossing so the crossing itself is guaranteed
        change = int(rng.integers(min(meet + 3, T), T + 1))
        c = _integrate((x, y + (k - 0.5)), (vx, vy), 1, T, change, rng.uniform(0.3, 2.5), 0.0)
        c = _hold_pair(c, meet, cfg.occlusion_frames, vy)
        tracks.append(ObjectTrack(k + 1, shape, colour, s, s, float(k), c, "crossing"))
    depths = depths + 2  # the pair takes depths 0 (near) and 1 (far)

    # 3: entry through the left edge after frame 1.
    w, h = size()
    start = int(rng.integers(2, max(3, T // 3)))
    c = _integrate(
        (-w / 2 + 2, rng.uniform(0.2, 0.8) * H),
        (rng.uniform(2.0, 4.0), rng.uniform(-1, 1)),
        start,
        T,
        *speed_change(start),
    )
    tracks.append(ObjectTrack(3, int(rng.integers(0, 3)), _colour(rng), w, h, depths[2], c, "entry"))

    # 4: exit through the right edge well before the end: starts inside near the edge, moving right fast
    # enough to be fully out by ~T/2, and only speeds up at its speed change.
    w, h = size()
    vx = (0.3 * W + w) / max(2, T // 2 - 2)
    change = int(rng.integers(2, max(3, T // 4 + 1)))
    c = _integrate(
        (0.7 * W, rng.uniform(0.2, 0.8) * H),
        (vx, rng.uniform(-0.5, 0.5)),
        1,
        T,
        change,
        rng.uniform(1.0, 2.0),
        0.0,
    )
    tracks.append(ObjectTrack(4, int(rng.integers(0, 3)), _colour(rng), w, h, depths[3], c, "exit"))

    # 5..: random objects (start inside at frame 1, or enter through a random edge later).
    for i in range(4, cfg.num_objects):
        w, h = size()
        sp = rng.uniform(1.0, 4.0)
        if rng.random() < 0.5:
            start = 1
            pos = (rng.uniform(w, W - w), rng.uniform(h, H - h))
            ang = rng.uniform(0, 2 * math.pi)
        else:
            start = int(rng.integers(1, max(2, T // 2)))
            edge = int(rng.integers(0, 4))
            pos = [
                (-w / 2, rng.uniform(0.1, 0.9) * H),
                (W + w / 2, rng.uniform(0.1, 0.9) * H),
                (rng.uniform(0.1, 0.9) * W, -h / 2),
                (rng.uniform(0.1, 0.9) * W, H + h / 2),
            ][edge]
            inward = [0.0, math.pi, math.pi / 2, -math.pi / 2][edge]
            ang = inward + rng.uniform(-0.6, 0.6)
        c = _integrate(pos, (sp * math.cos(ang), sp * math.sin(ang)), start, T, *speed_change(start))
        tracks.append(ObjectTrack(i + 1, int(rng.integers(0, 3)), _colour(rng), w, h, depths[i], c, "random"))

    for j in range(cfg.extra_crossings):
        tracks += _extra_crossing_pair(cfg, rng, cfg.num_objects + 2 * j + 1, cfg.num_objects + 2.0 + 2 * j)

    for tr in tracks:
        if camera is not None:
            tr.centres = tr.centres - camera  # the scene moves against the camera
        tr.centres = _cut_after_exit(tr.centres, tr.w, tr.h, cfg)
    return tracks


def _colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    return tuple(int(x) for x in PALETTE[rng.integers(0, len(PALETTE))])


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------
def write_sequence(split_dir: str, name: str, cfg: SyntheticVideoConfig, seed: int) -> Dict:
    """Render one sequence into ``<split_dir>/<name>``; returns a small summary dict."""
    import cv2

    video = SyntheticVideo(cfg, seed)
    seq_dir = os.path.join(split_dir, name)
    os.makedirs(os.path.join(seq_dir, "img1"), exist_ok=True)
    os.makedirs(os.path.join(seq_dir, "gt"), exist_ok=True)
    rows = []
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(cfg.jpeg_quality)]
    for f in range(1, cfg.num_frames + 1):
        image, _, r = video.render(f)
        rows.append(r)
        ok = cv2.imwrite(os.path.join(seq_dir, "img1", f"{f:06d}.jpg"), image[:, :, ::-1], params)
        if not ok:
            raise OSError(f"could not write {os.path.join(seq_dir, 'img1', f'{f:06d}.jpg')}")
    gt = np.concatenate(rows, 0)
    video._gt = gt
    write_gt_file(os.path.join(seq_dir, "gt", "gt.txt"), gt)
    write_seqinfo(
        os.path.join(seq_dir, "seqinfo.ini"),
        SeqInfo(name, "img1", cfg.frame_rate, cfg.num_frames, cfg.width, cfg.height, ".jpg"),
    )
    return {"name": name, "seed": seed, "num_rows": int(len(gt)), "num_ids": int(len(np.unique(gt[:, 1])))}


def generate_split(
    root: str, split: str, num_sequences: int, cfg: SyntheticVideoConfig, seed: int
) -> List[Dict]:
    """Write ``num_sequences`` sequences named ``SYN-<split>-NN`` into ``<root>/<split>``."""
    split_dir = os.path.join(root, split)
    os.makedirs(split_dir, exist_ok=True)
    out = []
    for i in range(num_sequences):
        # distinct, reproducible seed per (split, index)
        seq_seed = int(np.random.SeedSequence([seed, i, sum(map(ord, split))]).generate_state(1)[0])
        out.append(write_sequence(split_dir, f"SYN-{split}-{i + 1:02d}", cfg, seq_seed))
    return out


DONE_MARKER = ".complete"


def generate_dataset(
    root: str,
    splits: Dict[str, int] | None = None,
    cfg: SyntheticVideoConfig = SyntheticVideoConfig(),
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Generate the whole synthetic MOT set atomically at ``root`` (default splits: train 4, val 2 sequences).

    The data is written into a temporary sibling folder which is renamed to ``root`` at the end, so concurrent
    callers never see a half-written set; if ``root`` already holds a complete set it is reused.
    """
    splits = {"train": 4, "val": 2} if splits is None else dict(splits)
    for split, n in splits.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"synthetic split {split!r}: sequence count must be an integer >= 0, got {n!r}")
    root = os.path.abspath(root)
    recipe = json.dumps({"seed": seed, "splits": splits, "config": _recipe_config(cfg)}, sort_keys=True)
    marker = os.path.join(root, DONE_MARKER)
    if os.path.isfile(marker) and not overwrite:
        _check_recipe(marker, recipe)
        return root
    if os.path.exists(root) and not overwrite:
        raise FileExistsError(
            f"{root} exists but is not a complete synthetic MOT set (no {DONE_MARKER}); remove it"
        )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        for split, n in splits.items():
            generate_split(tmp, split, n, cfg, seed)
        with open(os.path.join(tmp, DONE_MARKER), "w") as f:
            f.write(recipe + "\n")
        if overwrite and os.path.exists(root):
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:
            # somebody else finished first: use theirs if it is complete (and made from the same recipe)
            if not os.path.isfile(marker):
                raise
            _check_recipe(marker, recipe)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


_LATER_FIELDS = ("extra_crossings", "occlusion_frames", "camera_motion")


def _recipe_config(cfg: SyntheticVideoConfig) -> Dict:
    """``asdict(cfg)`` without the fields added later while they keep their default (off) values, so a set
    generated before they existed still matches its recipe (their defaults change nothing in the output)."""
    defaults = {f.name: f.default for f in fields(SyntheticVideoConfig)}
    d = asdict(cfg)
    for k in _LATER_FIELDS:
        if d[k] == defaults[k]:
            del d[k]
    return d


def _check_recipe(marker: str, recipe: str) -> None:
    with open(marker) as f:
        found = f.read().strip()
    if found != recipe:
        raise ValueError(
            f"{os.path.dirname(marker)} holds a synthetic MOT set made with a different seed/splits/config:\n"
            f"  on disk:   {found}\n  requested: {recipe}\nremove the folder or pass overwrite=True"
        )
