"""Deterministic procedural person crops in the Market-1501 layout.

The README's main command has to run on a machine with no downloaded dataset, so this module
draws a small re-identification dataset from numpy/cv2 primitives:

* an identity (`PersonSpec`) fixes clothing colours and pattern, lower-garment style,
  accessory, hair/skin and body proportions; identities are sampled independently, so two of
  them may share some attributes, and a few are deliberate "near twins" of their predecessor
  that differ in one or two attributes (that keeps the task from being a colour lookup);
* a camera (`CameraSpec`) fixes the background (gradient, texture, clutter, floor),
  illumination (gain, colour cast, gamma), where and how large people appear, blur,
  resolution, sensor noise, JPEG quality and which way people tend to face it;
* every image adds its own pose (arm swing, stride, facing), placement jitter and noise.

Everything derives from one integer seed through `numpy.random.SeedSequence` keyed by
(purpose, pid, camera, index), so a file's bytes do not depend on generation order and the
same seed reproduces byte-identical JPEGs (given the same OpenCV build).

Layout written by `generate_reid_dataset` (names are ``PPPP_cCsS_FFFFFF_00.jpg`` with a
1-based camera index, as in Market-1501)::

    <root>/<name>/bounding_box_train/0001_c1s1_000101_00.jpg
    <root>/<name>/query/...
    <root>/<name>/bounding_box_test/...   (includes pid 0000 distractors)
    <root>/<name>/_COMPLETE               (JSON of the parameters, written last)
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "CameraSpec",
    "PersonSpec",
    "dataset_summary",
    "encode_jpeg",
    "generate_reid_dataset",
    "make_camera",
    "make_identity",
    "render_person",
]

# Bump when the drawing changes: the marker then no longer matches and old data is not reused.
GENERATOR_VERSION = 1
MARKER_NAME = "_COMPLETE"
SUBDIRS = ("bounding_box_train", "query", "bounding_box_test")

Color = tuple[int, int, int]

# Seed-sequence purpose tags; keep them stable, they are part of what a seed means.
_TAG_IDENTITY, _TAG_CAMERA, _TAG_IMAGE, _TAG_SPLIT, _TAG_DISTRACTOR = 1, 2, 3, 4, 5

# RGB palettes. Upper garments range over saturated and neutral colours; lower garments lean
# towards the darks, denims and khakis people actually wear, which makes bottoms less
# discriminative than tops (as in real data).
UPPER_PALETTE: tuple[Color, ...] = (
    (24, 24, 28), (236, 236, 230), (128, 128, 130), (70, 70, 76), (30, 40, 92), (52, 92, 182),
    (132, 172, 222), (184, 32, 38), (112, 26, 42), (232, 122, 32), (232, 202, 52), (42, 122, 62),
    (112, 112, 52), (102, 52, 132), (232, 142, 172), (112, 72, 42), (202, 182, 142), (32, 132, 132),
)
LOWER_PALETTE: tuple[Color, ...] = (
    (22, 22, 26), (34, 42, 78), (62, 82, 122), (96, 118, 160), (118, 118, 120), (64, 64, 68),
    (196, 178, 138), (150, 128, 90), (92, 62, 40), (226, 226, 220), (90, 96, 52), (130, 30, 36),
)
SKIN_PALETTE: tuple[Color, ...] = (
    (248, 214, 186), (232, 190, 152), (210, 160, 120), (176, 124, 88), (132, 88, 58), (92, 60, 40),
)
HAIR_PALETTE: tuple[Color, ...] = (
    (18, 16, 14), (52, 34, 22), (96, 62, 34), (196, 160, 96), (150, 148, 142), (142, 62, 30),
)
SHOE_PALETTE: tuple[Color, ...] = (
    (20, 20, 20), (240, 240, 240), (92, 60, 38), (60, 60, 66), (40, 50, 110), (170, 40, 40),
)

PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo")
PATTERN_PROBS = (0.40, 0.17, 0.13, 0.12, 0.18)
ACCESSORIES = ("none", "backpack", "bag", "hat")
ACCESSORY_PROBS = (0.40, 0.25, 0.20, 0.15)
LOWER_STYLES = ("trousers", "shorts", "skirt")
LOWER_STYLE_PROBS = (0.70, 0.18, 0.12)
FACINGS = ("front", "back", "left", "right")


@dataclass(frozen=True)
class PersonSpec:
    """Everything that stays fixed for one identity across cameras (colours are RGB)."""

    pid: int
    upper_color: Color
    pattern: str  # one of PATTERNS
    pattern_color: Color
    pattern_period: float  # stripe/check period as a fraction of body height
    long_sleeves: bool
    lower_color: Color
    lower_style: str  # one of LOWER_STYLES
    shoe_color: Color
    skin_color: Color
    hair_color: Color
    long_hair: bool
    accessory: str  # one of ACCESSORIES
    accessory_color: Color
    accessory_side: int  # -1 left / +1 right (from the person's front), for the side bag
    width_scale: float  # body width relative to the average
    height_scale: float  # body height relative to the average (crops are normalised anyway)
    leg_ratio: float  # fraction of the body height taken by the legs


@dataclass(frozen=True)
class CameraSpec:
    """Everything that stays fixed for one camera; `camid` is 1-based as in file names."""

    camid: int
    bg_seed: int  # seed of this camera's background panorama
    bg_top: Color
    bg_bottom: Color
    floor_color: Color
    horizon: float  # floor starts at this fraction of the panorama height
    texture_amp: float  # amplitude of the low-frequency background texture (0-255 scale)
    n_clutter: int
    gain: float  # global exposure multiplier
    cast: tuple[float, float, float]  # per-channel RGB multiplier (white balance error)
    gamma: float
    scale_mean: float  # mean person height as a fraction of the crop height
    scale_jitter: float
    x_jitter: float  # std of the horizontal offset, fraction of the crop width
    blur_sigma: float  # Gaussian blur in pixels at 128 px crop width
    resolution: float  # <1 renders at lower resolution then upsamples (a poorer camera)
    noise_sigma: float
    jpeg_quality: int
    facing_probs: tuple[float, float, float, float]  # P(front, back, left, right)


# ----------------------------------------------------------------------------- specs


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A generator that depends only on (seed, key), never on how many draws happened before."""
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in key)))


def _jitter(rng: np.random.Generator, color: Color, amount: float) -> Color:
    c = np.asarray(color, np.float64) + rng.normal(0.0, amount, 3)
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, items: Sequence[Any], probs: Sequence[float] | None = None) -> Any:
    return items[int(rng.choice(len(items), p=probs))]


def _pick_color(rng: np.random.Generator, palette: Sequence[Color], avoid: Color | None = None) -> Color:
    # Re-draw once when the colour equals `avoid`, so a pattern is not invisible on its base.
    c = _pick(rng, palette)
    if avoid is not None and c == avoid:
        c = _pick(rng, [p for p in palette if p != avoid])
    return c


def _sample_identity(pid: int, rng: np.random.Generator) -> PersonSpec:
    upper = _pick_color(rng, UPPER_PALETTE)
    return PersonSpec(
        pid=pid,
        upper_color=_jitter(rng, upper, 10.0),
        pattern=_pick(rng, PATTERNS, PATTERN_PROBS),
        pattern_color=_jitter(rng, _pick_color(rng, UPPER_PALETTE, avoid=upper), 10.0),
        pattern_period=float(rng.uniform(0.035, 0.07)),
        long_sleeves=bool(rng.random() < 0.5),
        lower_color=_jitter(rng, _pick_color(rng, LOWER_PALETTE), 8.0),
        lower_style=_pick(rng, LOWER_STYLES, LOWER_STYLE_PROBS),
        shoe_color=_jitter(rng, _pick_color(rng, SHOE_PALETTE), 6.0),
        skin_color=_jitter(rng, _pick_color(rng, SKIN_PALETTE), 6.0),
        hair_color=_jitter(rng, _pick_color(rng, HAIR_PALETTE), 6.0),
        long_hair=bool(rng.random() < 0.3),
        accessory=_pick(rng, ACCESSORIES, ACCESSORY_PROBS),
        accessory_color=_jitter(rng, _pick_color(rng, UPPER_PALETTE + LOWER_PALETTE), 8.0),
        accessory_side=int(rng.choice([-1, 1])),
        width_scale=float(np.clip(rng.normal(1.0, 0.11), 0.78, 1.3)),
        height_scale=float(np.clip(rng.normal(1.0, 0.05), 0.9, 1.1)),
        leg_ratio=float(rng.uniform(0.43, 0.5)),
    )


@functools.lru_cache(maxsize=4096)
def make_identity(pid: int, seed: int = 0, twin_prob: float = 0.15, split_start: int = 1) -> PersonSpec:
    """The identity `pid` of dataset `seed`.

    With probability `twin_prob` the identity is a near twin of `pid - 1`: it copies that
    identity's base attributes except one or two attribute groups. Twins make
    nearest-neighbour-by-colour imperfect, which is what real crowds look like. `split_start`
    is the first pid of the split `pid` belongs to (in `generate_reid_dataset`: 1 for train,
    `num_train_ids + 1` for test), so a test id is never a twin of a train id.
    """
    rng = _rng(seed, _TAG_IDENTITY, pid)
    own = _sample_identity(pid, rng)
    twin_of = pid - 1
    if twin_of < max(1, split_start) or rng.random() >= twin_prob:
        return own
    # The twin's base is drawn from its own seed (not recursively from *its* twin), so each
    # identity costs O(1) and does not depend on which other ids exist.
    base = _sample_identity(pid, _rng(seed, _TAG_IDENTITY, twin_of))
    groups = (
        ("upper_color",),
        ("pattern", "pattern_color", "pattern_period"),
        ("lower_color", "lower_style"),
        ("accessory", "accessory_color", "accessory_side"),
        ("hair_color", "long_hair", "skin_color"),
        ("width_scale", "height_scale", "leg_ratio", "long_sleeves"),
    )
    n_changes = int(rng.integers(1, 3))
    changed = {f for g in rng.choice(len(groups), n_changes, replace=False) for f in groups[int(g)]}
    return replace(base, **{f: getattr(own, f) for f in changed})


@functools.lru_cache(maxsize=256)
def make_camera(camid: int, seed: int = 0) -> CameraSpec:
    """Camera `camid` (1-based) of dataset `seed`; independent of how many cameras there are."""
    rng = _rng(seed, _TAG_CAMERA, camid)

    def muted(lo: float, hi: float) -> Color:
        # Backgrounds are mostly desaturated (walls, pavement) with a tint of one hue.
        grey = rng.uniform(lo, hi)
        tint = rng.normal(0.0, 12.0, 3)
        return tuple(int(v) for v in np.clip(grey + tint, 0, 255))  # type: ignore[return-value]

    facing = rng.dirichlet([2.0, 2.0, 1.0, 1.0])
    return CameraSpec(
        camid=camid,
        bg_seed=int(rng.integers(0, 2**31 - 1)),
        bg_top=muted(95, 195),
        bg_bottom=muted(85, 175),
        floor_color=muted(75, 160),
        horizon=float(rng.uniform(0.5, 0.75)),
        texture_amp=float(rng.uniform(6, 26)),
        n_clutter=int(rng.integers(3, 10)),
        gain=float(rng.uniform(0.8, 1.2)),
        cast=tuple(float(v) for v in rng.uniform(0.9, 1.1, 3)),  # type: ignore[arg-type]
        gamma=float(rng.uniform(0.85, 1.18)),
        scale_mean=float(rng.uniform(0.8, 0.92)),
        scale_jitter=float(rng.uniform(0.015, 0.04)),
        x_jitter=float(rng.uniform(0.02, 0.06)),
        blur_sigma=float(rng.choice([0.0, 0.5, 0.9, 1.3, 1.7])),
        resolution=float(rng.choice([1.0, 1.0, 0.75, 0.55])),
        noise_sigma=float(rng.uniform(1.0, 5.0)),
        jpeg_quality=int(rng.integers(60, 96)),
        facing_probs=tuple(float(v) for v in facing),  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------- drawing

_SHIFT = 4  # cv2 fixed-point bits: sub-pixel vertices keep thin limbs from jumping between pixels
_ONE = 1 << _SHIFT


def _pts(points: Iterable[tuple[float, float]]) -> np.ndarray:
    return np.round(np.asarray(list(points), np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2)


class _Layer:
    """An RGB person layer plus its anti-aliased coverage mask."""

    def __init__(self, h: int, w: int) -> None:
        self.rgb = np.zeros((h, w, 3), np.uint8)
        self.alpha = np.zeros((h, w), np.uint8)

    def poly(self, points: Iterable[tuple[float, float]], color: Color, mask: np.ndarray | None = None) -> None:
        p = _pts(points)
        cv2.fillPoly(self.rgb, [p], color, cv2.LINE_AA, _SHIFT)
        cv2.fillPoly(self.alpha, [p], 255, cv2.LINE_AA, _SHIFT)
        if mask is not None:
            cv2.fillPoly(mask, [p], 255, cv2.LINE_AA, _SHIFT)

    def ellipse(
        self, center: tuple[float, float], axes: tuple[float, float], color: Color,
        angle: float = 0.0, start: float = 0.0, end: float = 360.0,
    ) -> None:
        c = (round(float(center[0]) * _ONE), round(float(center[1]) * _ONE))
        a = (max(1, round(float(axes[0]) * _ONE)), max(1, round(float(axes[1]) * _ONE)))
        cv2.ellipse(self.rgb, c, a, angle, start, end, color, -1, cv2.LINE_AA, _SHIFT)
        cv2.ellipse(self.alpha, c, a, angle, start, end, 255, -1, cv2.LINE_AA, _SHIFT)

    def limb(self, p0: tuple[float, float], p1: tuple[float, float], w0: float, w1: float, color: Color,
             mask: np.ndarray | None = None) -> None:
        """A tapered quad from p0 (width w0) to p1 (width w1): arms and legs."""
        d = np.subtract(p1, p0)
        n = np.array([-d[1], d[0]]) / max(1e-6, float(np.hypot(*d)))
        a, b = np.asarray(p0), np.asarray(p1)
        quad = [a + n * w0 / 2, b + n * w1 / 2, b - n * w1 / 2, a - n * w0 / 2]
        self.poly([tuple(q) for q in quad], color, mask)


def _pattern_image(spec: PersonSpec, h: int, w: int, cx: float, y0: float, ph: float, facing: str) -> np.ndarray:
    """Upper-garment texture over the whole canvas; it is only used inside the garment mask.

    `y0` is the top of the person; stripes are phased from the shoulders.
    """
    period = max(2.0, spec.pattern_period * ph)
    ys = np.arange(h, dtype=np.float32)[:, None]  # broadcasting grids: cheaper than mgrid
    xs = np.arange(w, dtype=np.float32)[None, :]
    on: np.ndarray | None = None
    ys0 = y0 + 0.16 * ph
    if spec.pattern == "hstripes":
        on = ((ys - ys0) // (period / 2)) % 2 == 1
    elif spec.pattern == "vstripes":
        on = ((xs - cx) // (period / 2)) % 2 == 1
    elif spec.pattern == "checks":
        on = (((ys - ys0) // (period / 2)) + ((xs - cx) // (period / 2))) % 2 == 1
    elif spec.pattern == "logo" and facing != "back":
        # A chest print: visible from the front and (shifted) from the side, not from the back.
        lx = cx + (0.0 if facing == "front" else (0.03 if facing == "right" else -0.03) * ph)
        half = 0.05 * ph * (1.0 if facing == "front" else 0.6)
        on = (np.abs(xs - lx) < half) & (ys > y0 + 0.22 * ph) & (ys < y0 + 0.3 * ph)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = spec.upper_color
    if on is not None:
        img[np.broadcast_to(on, (h, w))] = spec.pattern_color
    return img


def _draw_person(
    layer: _Layer, spec: PersonSpec, cx: float, y0: float, ph: float, facing: str,
    arm_swing: float, stride: float, lean: float,
) -> None:
    """Draw one person with feet near y0 + ph; every length is a fraction of the height ph."""
    h, w = layer.alpha.shape
    side = facing in ("left", "right")
    dirn = 1.0 if facing == "right" else -1.0  # which way a side-facing person looks
    ws = spec.width_scale * (0.62 if side else 1.0)
    leg_top = y0 + (1.0 - spec.leg_ratio) * ph
    waist = leg_top - 0.03 * ph
    shoulder_y = y0 + 0.16 * ph
    sw = 0.12 * ph * ws  # half shoulder width
    hw = 0.10 * ph * ws  # half hip width
    head_c = (cx + lean * 0.1 * ph, y0 + 0.075 * ph)
    head_ax = (0.052 * ph * (0.8 if side else 1.0), 0.068 * ph)
    ankle_y = y0 + 0.955 * ph
    leg_w = 0.085 * ph * spec.width_scale

    # Seen from the front the bag hangs on the person's own side, i.e. mirrored on screen.
    acc_x = spec.accessory_side * (-1.0 if facing == "front" else 1.0)

    # Things behind the body first: long hair, a backpack seen from the side or the front.
    if spec.long_hair and facing != "back":
        layer.poly([(head_c[0] - head_ax[0] * 1.05, head_c[1]), (head_c[0] + head_ax[0] * 1.05, head_c[1]),
                    (head_c[0] + head_ax[0] * 1.2, y0 + 0.25 * ph), (head_c[0] - head_ax[0] * 1.2, y0 + 0.25 * ph)],
                   spec.hair_color)
    if spec.accessory == "backpack" and side:
        bx = cx - dirn * sw * 1.05
        layer.poly([(bx - 0.07 * ph, shoulder_y + 0.02 * ph), (bx + 0.07 * ph, shoulder_y + 0.02 * ph),
                    (bx + 0.07 * ph, waist - 0.03 * ph), (bx - 0.07 * ph, waist - 0.03 * ph)], spec.accessory_color)

    # Legs: lower garment to the ankle (trousers) or to the knee (shorts/skirt), skin below.
    knee_y = leg_top + 0.48 * (ankle_y - leg_top)
    for s in (-1.0, 1.0):
        hip = (cx + s * hw * 0.5, leg_top)
        foot_x = cx + s * hw * 0.5 + s * stride * ph * (1.0 if not side else 1.6)
        ankle = (foot_x, ankle_y)
        knee = ((hip[0] + ankle[0]) / 2, knee_y)
        layer.limb(knee, ankle, leg_w * 0.85, leg_w * 0.7, spec.skin_color if spec.lower_style != "trousers"
                   else spec.lower_color)
        layer.limb(hip, knee, leg_w, leg_w * 0.85, spec.lower_color if spec.lower_style != "skirt"
                   else spec.skin_color)
        shoe_dx = (dirn * 0.03 * ph) if side else 0.0
        layer.ellipse((foot_x + shoe_dx, ankle_y + 0.015 * ph), (0.045 * ph * (1.3 if side else 1.0), 0.022 * ph),
                      spec.shoe_color)
    # Hips/skirt block joining the legs to the torso.
    if spec.lower_style == "skirt":
        layer.poly([(cx - hw * 1.05, waist), (cx + hw * 1.05, waist), (cx + hw * 1.6, knee_y + 0.02 * ph),
                    (cx - hw * 1.6, knee_y + 0.02 * ph)], spec.lower_color)
    else:
        layer.poly([(cx - hw * 1.05, waist), (cx + hw * 1.05, waist), (cx + hw * 1.05, leg_top + 0.05 * ph),
                    (cx - hw * 1.05, leg_top + 0.05 * ph)], spec.lower_color)

    # Upper garment: torso and sleeves go into one mask, then the pattern fills that mask.
    upper = np.zeros((h, w), np.uint8)
    neck_y = y0 + 0.135 * ph
    layer.poly([(cx - 0.022 * ph, neck_y), (cx + 0.022 * ph, neck_y), (cx + 0.022 * ph, shoulder_y + 0.01 * ph),
                (cx - 0.022 * ph, shoulder_y + 0.01 * ph)], spec.skin_color)
    torso = [(cx - sw * 0.75, shoulder_y - 0.012 * ph), (cx + sw * 0.75, shoulder_y - 0.012 * ph),
             (cx + sw, shoulder_y + 0.02 * ph), (cx + hw * 1.05, waist + 0.02 * ph),
             (cx - hw * 1.05, waist + 0.02 * ph), (cx - sw, shoulder_y + 0.02 * ph)]
    layer.poly(torso, spec.upper_color, upper)
    arm_len = 0.33 * ph
    arm_w = 0.055 * ph * spec.width_scale
    arms = [(-1.0, arm_swing), (1.0, -arm_swing)] if not side else [(dirn, arm_swing)]
    hands: list[tuple[float, float]] = []
    elbows: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for s, swing in arms:
        sh = (cx + s * (sw - arm_w * 0.35) if not side else cx - dirn * 0.01 * ph, shoulder_y + 0.015 * ph)
        # Arms hang slightly outwards (front/back) and swing forwards/backwards (side view).
        ang = (s * 0.12 + swing * 0.3) if not side else swing
        hand = (sh[0] + np.sin(ang) * arm_len, sh[1] + np.cos(ang) * arm_len)
        elbow = (sh[0] + (hand[0] - sh[0]) * 0.5, sh[1] + (hand[1] - sh[1]) * 0.5)
        sleeve_end = hand if spec.long_sleeves else elbow
        layer.limb(sh, sleeve_end, arm_w * 1.1, arm_w * 0.85, spec.upper_color, upper)
        hands.append(hand)
        elbows.append((elbow, hand))
    # Composite the pattern over the garment only where the garment mask is solid enough.
    if spec.pattern != "plain":
        pat = _pattern_image(spec, h, w, cx, y0, ph, facing)
        m = (upper.astype(np.float32) / 255.0)[..., None]
        layer.rgb[:] = np.round(layer.rgb * (1.0 - m) + pat * m).astype(np.uint8)
    for (elbow, hand) in elbows:
        if not spec.long_sleeves:
            layer.limb(elbow, hand, arm_w * 0.75, arm_w * 0.65, spec.skin_color)
        layer.ellipse(hand, (arm_w * 0.45, arm_w * 0.55), spec.skin_color)

    # Accessories on top of the body.
    if spec.accessory == "backpack":
        if facing == "back":
            layer.poly([(cx - sw * 0.8, shoulder_y + 0.02 * ph), (cx + sw * 0.8, shoulder_y + 0.02 * ph),
                        (cx + sw * 0.85, waist - 0.02 * ph), (cx - sw * 0.85, waist - 0.02 * ph)],
                       spec.accessory_color)
        elif facing == "front":
            for s in (-1.0, 1.0):  # only the straps are visible from the front
                layer.limb((cx + s * sw * 0.55, shoulder_y - 0.005 * ph), (cx + s * sw * 0.7, waist - 0.06 * ph),
                           0.018 * ph, 0.018 * ph, spec.accessory_color)
        else:
            layer.limb((cx, shoulder_y), (cx - dirn * sw * 0.9, waist - 0.06 * ph), 0.018 * ph, 0.018 * ph,
                       spec.accessory_color)
    elif spec.accessory == "bag":
        bag_x = cx + acc_x * (hw * 1.05 + 0.03 * ph) if not side else cx + acc_x * 0.02 * ph
        strap_top = (cx - acc_x * sw * 0.6, shoulder_y) if not side else (cx, shoulder_y)
        layer.limb(strap_top, (bag_x, waist - 0.01 * ph), 0.014 * ph, 0.014 * ph, spec.accessory_color)
        layer.poly([(bag_x - 0.055 * ph, waist - 0.01 * ph), (bag_x + 0.055 * ph, waist - 0.01 * ph),
                    (bag_x + 0.06 * ph, waist + 0.085 * ph), (bag_x - 0.06 * ph, waist + 0.085 * ph)],
                   spec.accessory_color)

    # Head, hair, hat. From the back the hair covers the whole head.
    layer.ellipse(head_c, head_ax, spec.skin_color)
    if facing == "back":
        layer.ellipse((head_c[0], head_c[1] - 0.004 * ph), (head_ax[0] * 1.05, head_ax[1] * 1.02), spec.hair_color)
    elif side:
        layer.ellipse((head_c[0] - dirn * 0.012 * ph, head_c[1] - 0.012 * ph), (head_ax[0] * 1.02, head_ax[1] * 0.9),
                      spec.hair_color, 0.0, 180.0 if dirn > 0 else -90.0, 360.0 if dirn > 0 else 180.0)
        layer.ellipse((head_c[0] - dirn * 0.01 * ph, head_c[1] - 0.01 * ph), (head_ax[0] * 1.02, head_ax[1] * 0.92),
                      spec.hair_color, 0.0, 180.0, 360.0)
    else:
        layer.ellipse((head_c[0], head_c[1] - 0.012 * ph), (head_ax[0] * 1.06, head_ax[1] * 0.82),
                      spec.hair_color, 0.0, 180.0, 360.0)
    if spec.accessory == "hat":
        top = head_c[1] - head_ax[1] * 0.45
        layer.ellipse((head_c[0], top), (head_ax[0] * 1.08, head_ax[1] * 0.62), spec.accessory_color, 0.0, 180.0, 360.0)
        brim_dx = dirn * head_ax[0] * 0.7 if side else 0.0
        layer.poly([(head_c[0] - head_ax[0] * 1.2 + brim_dx, top - 0.004 * ph),
                    (head_c[0] + head_ax[0] * 1.2 + brim_dx, top - 0.004 * ph),
                    (head_c[0] + head_ax[0] * 1.2 + brim_dx, top + 0.012 * ph),
                    (head_c[0] - head_ax[0] * 1.2 + brim_dx, top + 0.012 * ph)], spec.accessory_color)


@functools.lru_cache(maxsize=64)
def _panorama(camera: CameraSpec, h: int, w: int) -> np.ndarray:
    """A camera's background scene, wider and taller than a crop; crops take random windows."""
    rng = np.random.default_rng(camera.bg_seed)
    ph, pw = int(h * 1.3), int(w * 3)
    t = np.linspace(0.0, 1.0, ph, dtype=np.float32)[:, None, None]
    img = (1 - t) * np.asarray(camera.bg_top, np.float32) + t * np.asarray(camera.bg_bottom, np.float32)
    img = np.repeat(img, pw, axis=1)
    hy = int(camera.horizon * ph)
    # Floor: its own colour, darker towards the horizon (cheap perspective), with tile lines.
    ft = np.linspace(0.75, 1.1, ph - hy, dtype=np.float32)[:, None, None]
    img[hy:] = np.asarray(camera.floor_color, np.float32) * ft
    for k in range(1, 6):
        y = hy + int((ph - hy) * (k / 6) ** 1.6)
        img[y:y + max(1, h // 128)] *= 0.85
    # Clutter: shop fronts, doors, poles, signs. Most stand on or above the horizon.
    for _ in range(camera.n_clutter):
        cw = int(rng.uniform(0.05, 0.5) * w)
        ch = int(rng.uniform(0.1, 0.6) * h)
        x = int(rng.uniform(0, pw - cw))
        y = int(np.clip(hy - ch + rng.normal(0, 0.05 * h), 0, ph - ch))
        col = rng.uniform(30, 230, 3).astype(np.float32)
        col = 0.4 * col + 0.6 * img[min(ph - 1, y + ch // 2), x + cw // 2]  # tone clutter towards the scene
        img[y:y + ch, x:x + cw] = col
        if rng.random() < 0.5:  # a frame/window inside the block
            b = max(1, cw // 6)
            img[y + b:y + ch - b, x + b:x + cw - b] = col * rng.uniform(0.6, 1.3)
    # Low-frequency texture (stains, lighting falloff) plus a little high-frequency grain.
    # Mostly luminance: independent per-channel noise would paint psychedelic colour blobs.
    lo = rng.normal(0.0, 1.0, (max(2, ph // 24), max(2, pw // 24), 3)).astype(np.float32)
    lo = lo[..., :1] + 0.3 * lo[..., 1:2] * np.array([1.0, -0.5, -0.5], np.float32)
    img += cv2.resize(lo, (pw, ph), interpolation=cv2.INTER_CUBIC) * camera.texture_amp
    img += rng.normal(0.0, camera.texture_amp * 0.25, (ph, pw, 1)).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), 0.6 * max(1.0, w / 128))
    out = np.clip(img, 0, 255).astype(np.float32)
    out.setflags(write=False)  # shared through the cache
    return out


@functools.lru_cache(maxsize=64)
def _gamma_lut(gamma: float) -> np.ndarray:
    return np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** gamma), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _noise_bank(camera: CameraSpec, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(camera.bg_seed + 1)
    out = rng.standard_normal((2 * h, 2 * w, 3), dtype=np.float32) * np.float32(camera.noise_sigma)
    out.setflags(write=False)  # shared through the cache
    return out


def _render(
    identity: PersonSpec | None, camera: CameraSpec, rng: np.random.Generator, size: tuple[int, int],
    scale_mul: float = 1.0, x_off: float = 0.0,
) -> np.ndarray:
    h, w = size
    pano = _panorama(camera, h, w)
    # Random window of the camera's scene: the detector box moves with the person.
    oy = int(rng.integers(0, pano.shape[0] - h + 1))
    ox = int(rng.integers(0, pano.shape[1] - w + 1))
    img = pano[oy:oy + h, ox:ox + w].copy()

    facing = FACINGS[int(rng.choice(4, p=camera.facing_probs))]
    scale = float(np.clip(rng.normal(camera.scale_mean, camera.scale_jitter), 0.68, 0.97)) * scale_mul
    ph = h * scale * (identity.height_scale if identity is not None else 1.0) ** 0.5
    cx = w / 2 + rng.normal(0.0, camera.x_jitter * w) + x_off * w
    y0 = float(np.clip((h - ph) * rng.uniform(0.3, 0.7), -ph, h))
    arm_swing = float(rng.normal(0.0, 0.25))
    stride = float(abs(rng.normal(0.0, 0.035)))
    lean = float(rng.normal(0.0, 0.05))

    if identity is not None:
        layer = _Layer(h, w)
        _draw_person(layer, identity, cx, y0, ph, facing, arm_swing, stride, lean)
        # Soft contact shadow under the feet so the person does not float.
        shadow = np.zeros((h, w), np.uint8)
        cv2.ellipse(shadow, (int(cx), int(y0 + 0.975 * ph)), (max(1, int(0.16 * ph * identity.width_scale)),
                    max(1, int(0.025 * ph))), 0, 0, 360, 255, -1, cv2.LINE_AA)
        img *= 1.0 - np.float32(0.35 / 255.0) * shadow.astype(np.float32)[..., None]
        # Cylindrical shading: body edges darker than its centre line, a hint of 3-D.
        xs = (np.arange(w, dtype=np.float32) - cx) / max(1.0, 0.2 * ph * identity.width_scale)
        shade = np.clip(1.0 - 0.22 * xs**2, 0.6, 1.0)[None, :, None]
        person = layer.rgb.astype(np.float32) * (shade * np.float32(rng.uniform(0.9, 1.1)))
        a = layer.alpha.astype(np.float32)[..., None] * np.float32(1 / 255)
        img = img * (1.0 - a) + person * a

    # Camera pipeline: optics/resolution, exposure and white balance, gamma, sensor noise.
    if camera.resolution < 1.0:
        small = (max(8, int(w * camera.resolution)), max(16, int(h * camera.resolution)))
        img = cv2.resize(cv2.resize(img, small, interpolation=cv2.INTER_AREA), (w, h),
                         interpolation=cv2.INTER_LINEAR)
    sigma = camera.blur_sigma * w / 128.0 * rng.uniform(0.8, 1.2)
    if sigma > 0.2:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    gain = camera.gain * rng.uniform(0.92, 1.08)  # per-frame exposure flicker
    img = img * (np.float32(gain) * np.asarray(camera.cast, np.float32))
    img = cv2.LUT(np.clip(np.rint(img), 0, 255).astype(np.uint8), _gamma_lut(camera.gamma))
    # Sensor noise: a random window of the camera's noise field (drawing fresh Gaussian noise for
    # every pixel was the single most expensive step of a render).
    bank = _noise_bank(camera, h, w)
    ny = int(rng.integers(0, bank.shape[0] - h + 1))
    nx = int(rng.integers(0, bank.shape[1] - w + 1))
    noisy = img.astype(np.float32) + bank[ny:ny + h, nx:nx + w]
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_person(
    identity: PersonSpec, camera: CameraSpec, rng: np.random.Generator, size: tuple[int, int] = (256, 128),
) -> np.ndarray:
    """Render one crop of `identity` seen by `camera`: an (H, W, 3) uint8 RGB array.

    `rng` supplies the per-image variation (pose, facing, placement, exposure flicker, noise);
    `size` is (height, width). JPEG compression is not applied here: `encode_jpeg` does it
    with the camera's quality when a file is written.
    """
    return _render(identity, camera, rng, size)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """RGB uint8 image -> JPEG bytes (deterministic for a given OpenCV build)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Job:
    subdir: str
    pid: int  # 0 for distractors
    camid: int
    index: int  # image index of (pid, camera)


def _file_name(job: _Job) -> str:
    # Frame numbers just have to be unique per (pid, camera); Market's sequence is always s1 here.
    frame = (job.pid * 100 + job.index + 1) % 1_000_000
    return f"{job.pid:04d}_c{job.camid}s1_{frame:06d}_00.jpg"


def _plan(
    num_train_ids: int, num_test_ids: int, num_cameras: int, per_cam: int, num_distractors: int,
    min_cameras_per_id: int, seed: int,
) -> list[_Job]:
    """Which (pid, camera, index) goes where. Test ids never overlap train ids (as in Market)."""
    jobs: list[_Job] = []
    for pid in range(1, num_train_ids + num_test_ids + 1):
        rng = _rng(seed, _TAG_SPLIT, pid)
        # Each identity walks past a random subset of cameras (at least two, for cross-camera pairs).
        k = int(rng.integers(min_cameras_per_id, num_cameras + 1))
        cams = sorted(int(c) + 1 for c in rng.choice(num_cameras, k, replace=False))
        if pid <= num_train_ids:
            jobs += [_Job("bounding_box_train", pid, c, i) for c in cams for i in range(per_cam)]
            continue
        # Query: one image from each of a proper subset of the id's cameras, so some camera is
        # left with gallery images only: every query has a cross-camera match.
        n_query = int(rng.integers(1, k))
        qcams = {int(c) for c in rng.choice(cams, n_query, replace=False)}
        for c in cams:
            qi = int(rng.integers(per_cam)) if c in qcams else -1
            for i in range(per_cam):
                jobs.append(_Job("query" if i == qi else "bounding_box_test", pid, c, i))
    # Distractors (pid 0000): background, a partial or badly placed person, as Market's junk boxes.
    for i in range(num_distractors):
        jobs.append(_Job("bounding_box_test", 0, i % num_cameras + 1, i))
    return jobs


def _render_job(job: _Job, seed: int, size: tuple[int, int], twin_prob: float, num_train_ids: int) -> bytes:
    camera = make_camera(job.camid, seed)
    if job.pid == 0:
        rng = _rng(seed, _TAG_DISTRACTOR, job.index)
        kind = int(rng.integers(3))
        if kind == 0:  # empty background
            img = _render(None, camera, rng, size)
        else:  # a stranger too large (torso only) or mostly outside the box
            stranger = _sample_identity(0, rng)
            if kind == 1:
                img = _render(stranger, camera, rng, size, scale_mul=float(rng.uniform(1.5, 2.3)))
            else:
                img = _render(stranger, camera, rng, size, x_off=float(rng.choice([-1, 1]) * rng.uniform(0.35, 0.5)))
        return encode_jpeg(img, camera.jpeg_quality)
    # Twins only pair ids of the same split: a test id cloned from a train id would leak.
    split_start = 1 if job.pid <= num_train_ids else num_train_ids + 1
    identity = make_identity(job.pid, seed, twin_prob, split_start)
    img = render_person(identity, camera, _rng(seed, _TAG_IMAGE, job.pid, job.camid, job.index), size)
    return encode_jpeg(img, camera.jpeg_quality)


def _write_jobs(
    jobs: list[_Job], tmp: str, seed: int, size: tuple[int, int], twin_prob: float, num_train_ids: int,
) -> int:
    """Render and write a chunk of jobs (a module-level function so a process pool can pickle it)."""
    for job in jobs:
        data = _render_job(job, seed, size, twin_prob, num_train_ids)
        (Path(tmp) / job.subdir / _file_name(job)).write_bytes(data)
    return len(jobs)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is optional; generation works without it
            return _NoBar()
        return tqdm(total=total, desc=desc, unit="img", leave=False)
    return _NoBar()


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate_reid_dataset(
    root: str | Path,
    num_train_ids: int = 60,
    num_test_ids: int = 40,
    num_cameras: int = 6,
    images_per_id_per_camera: int = 3,
    seed: int = 0,
    size: tuple[int, int] = (256, 128),
    overwrite: bool = False,
    *,
    name: str = "synthetic",
    num_distractors: int = 20,
    min_cameras_per_id: int = 2,
    twin_prob: float = 0.15,
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Write a synthetic Market-1501-style dataset under `root/name` and return that directory.

    Train ids are 1..num_train_ids, test ids follow. Each id appears in a random subset of
    at least `min_cameras_per_id` cameras with `images_per_id_per_camera` images in each. For
    test ids, one image per camera of a proper subset of its cameras goes to `query`, the rest
    to `bounding_box_test` (so every query has a gallery match from another camera), together
    with `num_distractors` pid-0000 junk crops. `size` is (height, width).

    The directory is built under a temporary name and renamed into place after the
    `_COMPLETE` marker (the parameters as JSON) is written, so an interrupted run never
    leaves a directory that looks finished. If a complete directory with the same parameters
    exists it is reused as is. A directory without the marker or with other parameters is
    replaced when `overwrite` is true, otherwise `FileExistsError` explains what to do.

    `workers` > 1 renders in that many processes (byte-identical files); it only pays off for
    datasets much larger than the default, since each process must import numpy and cv2 first.
    """
    if num_cameras < 2 or num_cameras > 9:
        raise ValueError("num_cameras must be in 2..9 (Market names hold a one-digit camera index)")
    if not 2 <= min_cameras_per_id <= num_cameras:
        raise ValueError("min_cameras_per_id must be in 2..num_cameras (queries need a cross-camera match)")
    if num_train_ids < 1 or num_test_ids < 1 or num_train_ids + num_test_ids > 9999:
        raise ValueError("need at least one train and one test id and at most 9999 ids in total")
    if not 1 <= images_per_id_per_camera <= 99:
        raise ValueError("images_per_id_per_camera must be in 1..99")
    if num_distractors < 0:
        raise ValueError("num_distractors must be >= 0")
    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 16:
        raise ValueError("size is (height, width) and must be at least (32, 16)")

    params: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "num_train_ids": num_train_ids,
        "num_test_ids": num_test_ids,
        "num_cameras": num_cameras,
        "images_per_id_per_camera": images_per_id_per_camera,
        "seed": int(seed),
        "size": [h, w],
        "num_distractors": num_distractors,
        "min_cameras_per_id": min_cameras_per_id,
        "twin_prob": float(twin_prob),
    }
    root = Path(root)
    out = root / name
    if out.exists():
        marker = _read_marker(out)
        if marker == params:
            return out
        if not overwrite:
            why = "has no _COMPLETE marker (an interrupted or foreign generation)" if marker is None else (
                "was generated with other parameters")
            raise FileExistsError(f"{out} {why}; remove that folder to regenerate it (in code: overwrite=True), "
                                  "or choose another root/name")

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for sub in SUBDIRS:
            (tmp / sub).mkdir(parents=True)
        jobs = _plan(num_train_ids, num_test_ids, num_cameras, images_per_id_per_camera, num_distractors,
                     min_cameras_per_id, int(seed))
        render = functools.partial(_write_jobs, tmp=str(tmp), seed=int(seed), size=(h, w),
                                   twin_prob=float(twin_prob), num_train_ids=num_train_ids)
        # Chunks of consecutive jobs: few enough round trips for a process pool, small enough
        # for a live progress bar. Every image has its own seed, so chunking changes no byte.
        chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]
        if progress:
            print(f"generating the synthetic dataset {out} ({len(jobs)} images, once; reused afterwards)",
                  file=sys.stderr, flush=True)
        bar = _progress(len(jobs), progress, f"generating {name}")
        if workers > 1 and len(chunks) > 1:
            # 'spawn': the caller may be a training script with torch threads, unsafe to fork.
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx) as pool:
                for n in pool.map(render, chunks):
                    bar.update(n)
        else:
            for chunk in chunks:
                bar.update(render(chunk))
        bar.close()
        (tmp / MARKER_NAME).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            if _read_marker(out) == params:  # a concurrent run finished first with the same data
                shutil.rmtree(tmp)
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def dataset_summary(path: str | Path) -> dict[str, dict[str, int]]:
    """Image, identity and camera counts per split of a generated dataset (for printing)."""
    path = Path(path)
    summary: dict[str, dict[str, int]] = {}
    for sub in SUBDIRS:
        files = sorted((path / sub).glob("*.jpg"))
        pids = {f.name.split("_")[0] for f in files}
        cams = {f.name.split("_")[1][1] for f in files}
        summary[sub] = {"images": len(files), "ids": len(pids), "cameras": len(cams)}
    return summary

