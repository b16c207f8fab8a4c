"""Synthetic street and harbour scenes with dense labels, deterministic by seed.

The pipeline must run end to end without downloading real data, so this module draws a small
dataset whose structure lets the papers' effects show:

* large "stuff" regions (sky, building, road, sidewalk, water, grass, tree) with irregular
  boundaries (skylines, horizons and shorelines perturbed by smooth 1-D noise);
* small "things" (car, boat, person, sign, buoy) and thin structures (pole);
* context-only classes, the PSPNet case: a car and a boat are drawn by the SAME function with
  the same size and colour distributions; only the surface under them (road in street scenes,
  water in harbour scenes) tells them apart.  Likewise a sign (on top of a pole) and a buoy
  (floating on water) share one look;
* textures carry the information that colour does not: road and water share one colour
  distribution (grainy asphalt vs. horizontal ripples), grass and tree overlap in green;
* a 1-px ignore (255) band on some object boundaries, like annotation voids in real datasets;
* random scene-level lighting (gain, tint, left-right ramp).

Each image is a pure function of (seed, split, index), so regenerating gives identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from segrepro.core import atomic
from segrepro.core.errors import SegreproError
from segrepro.core.paths import CARD
from segrepro.data.layout import IGNORE_INDEX, check_replaceable

CLASS_NAMES = (
    "sky", "building", "road", "sidewalk", "water", "grass", "tree",
    "car", "boat", "person", "pole", "sign", "buoy",
)
(SKY, BUILDING, ROAD, SIDEWALK, WATER, GRASS, TREE,
 CAR, BOAT, PERSON, POLE, SIGN, BUOY) = range(len(CLASS_NAMES))
STUFF_CLASSES = (SKY, BUILDING, ROAD, SIDEWALK, WATER, GRASS, TREE)
# Bump when the drawing changes, so a card tells which generator made the files.
GENERATOR_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1}
MIN_WIDTH, MIN_HEIGHT = 32, 24

# Shared palettes: the confusable pairs draw from the same list on purpose.
_VEHICLE_COLOURS = np.array(
    [(200, 30, 30), (30, 60, 180), (230, 230, 230), (35, 35, 40), (160, 160, 165), (220, 190, 40)],
    np.float32)
_PLATE_COLOURS = np.array(
    [(220, 30, 30), (240, 200, 20), (30, 80, 200), (240, 240, 240), (240, 120, 20)], np.float32)
_FACADE_COLOURS = np.array(
    [(150, 120, 100), (170, 160, 150), (120, 110, 105), (190, 175, 150), (110, 90, 80)], np.float32)
_SKIN_COLOURS = np.array([(230, 190, 160), (190, 140, 100), (120, 80, 55)], np.float32)


# ----------------------------------------------------------------------------- noise helpers

def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _noise_1d(rng: np.random.Generator, n: int, cell: float) -> np.ndarray:
    """Smooth noise in [-1, 1]: random knots every `cell` samples, eased in between."""
    knots = rng.uniform(-1.0, 1.0, int(n // cell) + 2)
    pos = np.arange(n) / cell
    i = pos.astype(int)
    t = _smoothstep(pos - i)
    return (knots[i] * (1.0 - t) + knots[i + 1] * t).astype(np.float32)


def _value_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float) -> np.ndarray:
    """2-D smooth noise in [-1, 1]; unequal cells give streaks (ripples, grass blades)."""
    grid = rng.uniform(-1.0, 1.0, (int(h // cell_y) + 2, int(w // cell_x) + 2))
    py, px = np.arange(h) / cell_y, np.arange(w) / cell_x
    iy, ix = py.astype(int), px.astype(int)
    ty = _smoothstep(py - iy)[:, None]
    tx = _smoothstep(px - ix)[None, :]
    rows0, rows1 = grid[iy], grid[iy + 1]
    top = rows0[:, ix] * (1.0 - tx) + rows0[:, ix + 1] * tx
    bottom = rows1[:, ix] * (1.0 - tx) + rows1[:, ix + 1] * tx
    return (top * (1.0 - ty) + bottom * ty).astype(np.float32)


def _edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the image border does not count)."""
    p = np.pad(mask, 1, mode="edge")
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


# ----------------------------------------------------------------------------- the canvas

class _Scene:
    """Image, label map and pixel grids of one scene under construction."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng = rng
        self.h, self.w = height, width
        yy, xx = np.mgrid[0:height, 0:width]
        self.yy = yy.astype(np.float32)
        self.xx = xx.astype(np.float32)
        self.img = np.zeros((height, width, 3), np.float32)
        self.lab = np.full((height, width), IGNORE_INDEX, np.uint8)

    def grain(self, sigma: float, channels: int = 3) -> np.ndarray:
        return self.rng.standard_normal((self.h, self.w, channels), dtype=np.float32) * sigma

    def fill(self, mask: np.ndarray, cls: int, texture: np.ndarray) -> None:
        """Paint a stuff region from a full-image texture."""
        self.img[mask] = texture[mask]
        self.lab[mask] = cls

    def paint(self, mask: np.ndarray, colour, shade=None, noise: float = 4.0) -> None:
        """Paint part of a thing: one colour, optional per-pixel shade factor, some noise."""
        n = int(mask.sum())
        values = np.broadcast_to(np.asarray(colour, np.float32), (n, 3)).copy()
        if shade is not None:
            values *= shade[:, None]
        values += self.rng.standard_normal((n, 1), dtype=np.float32) * noise
        self.img[mask] = values

    def label_thing(self, mask: np.ndarray, cls: int) -> None:
        """Label a thing; some get a 1-px ignore band on their outline, like annotation voids."""
        self.lab[mask] = cls
        if self.rng.random() < 0.3 and mask.sum() >= 40:
            self.lab[_edge(mask)] = IGNORE_INDEX


# ----------------------------------------------------------------------------- stuff textures

def _jitter(rng: np.random.Generator, base, spread: float) -> np.ndarray:
    return np.asarray(base, np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32)


def _sky_texture(s: _Scene, horizon: float) -> np.ndarray:
    top = _jitter(s.rng, (70, 120, 200), 25)
    low = _jitter(s.rng, (170, 200, 230), 20)
    t = np.clip(s.yy / max(horizon, 1.0), 0.0, 1.0)[..., None]
    clouds = np.clip(_value_noise(s.rng, s.h, s.w, 10, 24), 0.0, None)[..., None]
    return top * (1 - t) + low * t + clouds * s.rng.uniform(0, 70) + s.grain(1.5)


def _grey_blue(s: _Scene) -> np.ndarray:
    """The one colour distribution road and water share: only texture and context differ."""
    return _jitter(s.rng, (105, 110, 118), 6) + s.rng.uniform(-22, 22)


def _road_texture(s: _Scene) -> np.ndarray:
    grain = s.grain(11.0, 1) + s.grain(3.0)  # isotropic asphalt grain, mostly grey
    patches = _value_noise(s.rng, s.h, s.w, 8, 8)[..., None] * 6.0
    return _grey_blue(s) + grain + patches


def _water_texture(s: _Scene) -> np.ndarray:
    period = s.rng.uniform(3.0, 6.0)
    phase = _value_noise(s.rng, s.h, s.w, 4, 16) * 3.0
    ripples = np.sin(2 * np.pi * s.yy / period + phase)[..., None] * 9.0
    streaks = _value_noise(s.rng, s.h, s.w, 1, 14)[..., None] * 10.0  # rows vary independently
    return _grey_blue(s) + ripples + streaks + s.grain(2.0)


def _sidewalk_texture(s: _Scene) -> np.ndarray:
    base = _jitter(s.rng, (150, 142, 132), 15)
    tile = int(s.rng.integers(6, 10))
    joints = ((s.xx % tile) < 1) | (((s.yy + s.rng.integers(0, tile)) % tile) < 1)
    return base - joints[..., None] * 28.0 + s.grain(5.0)


def _grass_texture(s: _Scene) -> np.ndarray:
    base = _jitter(s.rng, (85, 125, 55), 20)
    blades = _value_noise(s.rng, s.h, s.w, 6, 1)[..., None] * 14.0  # vertical streaks
    return base + blades + s.grain(6.0)


def _tree_texture(s: _Scene) -> np.ndarray:
    base = _jitter(s.rng, (60, 100, 45), 20)
    clumps = _value_noise(s.rng, s.h, s.w, 4, 4)[..., None] * 28.0
    leaves = _value_noise(s.rng, s.h, s.w, 1.5, 1.5)[..., None] * 12.0
    return base + clumps + leaves + s.grain(4.0)


def _building_texture(s: _Scene, block_of_col: np.ndarray, starts: np.ndarray,
                      top_of_col: np.ndarray) -> np.ndarray:
    rng = s.rng
    n_blocks = len(starts)
    colours = _FACADE_COLOURS[rng.integers(0, len(_FACADE_COLOURS), n_blocks)]
    colours = colours + rng.uniform(-15, 15, (n_blocks, 3)).astype(np.float32)
    base = np.broadcast_to(colours[block_of_col][None, :, :], (s.h, s.w, 3))
    # A grid of windows per facade, some lit.
    px, py = int(rng.integers(5, 10)), int(rng.integers(6, 11))
    local_x = s.xx - starts[block_of_col][None, :]
    local_y = s.yy - top_of_col[None, :]
    windows = ((local_x % px) >= 2) & ((local_x % px) < 2 + px // 2) \
        & ((local_y % py) >= 2) & ((local_y % py) < 2 + py // 2)
    lit_table = rng.random((s.h // py + 3, s.w // px + 3)) < 0.2
    cell_y = np.clip(local_y // py, 0, lit_table.shape[0] - 1).astype(int)
    cell_x = np.clip(s.xx // px, 0, lit_table.shape[1] - 1).astype(int)
    factor = np.where(windows, np.where(lit_table[cell_y, cell_x], 1.35, 0.55), 1.0)
    return base * factor[..., None].astype(np.float32) + s.grain(4.0)


# ----------------------------------------------------------------------------- things

def _draw_vehicle(s: _Scene, x0: int, ybot: int, w: int, h: int) -> np.ndarray:
    """A car or a boat: same shape, colours and shading for both, only the caller's label differs."""
    rng, xx, yy = s.rng, s.xx, s.yy
    body_h = max(2, round(h * 0.55))
    cab_x0 = x0 + round(w * rng.uniform(0.1, 0.35))
    cab_x1 = x0 + max(round(w * rng.uniform(0.6, 0.9)), cab_x0 - x0 + 1)
    body = (xx >= x0) & (xx < x0 + w) & (yy > ybot - body_h) & (yy <= ybot)
    cabin = (xx >= cab_x0) & (xx < cab_x1) & (yy > ybot - h) & (yy <= ybot - body_h)
    strip = body & (yy > ybot - max(1, round(body_h * 0.25)))  # dark bottom: tyres / hull
    colour = _VEHICLE_COLOURS[rng.integers(0, len(_VEHICLE_COLOURS))] + rng.uniform(-15, 15, 3)
    s.paint(body, colour, shade=1.15 - 0.35 * (yy[body] - (ybot - h)) / h)
    s.paint(strip, colour * 0.35 + 10)
    window = _jitter(rng, (70, 90, 110), 15)
    s.paint(cabin, window, shade=1.2 - 0.4 * (yy[cabin] - (ybot - h)) / h, noise=3.0)
    return body | cabin


def _draw_plate(s: _Scene, xc: int, yc: int, r: int) -> np.ndarray:
    """A sign or a buoy: a disc or a square with a light centre, same distribution for both."""
    rng, xx, yy = s.rng, s.xx, s.yy
    if rng.random() < 0.5:
        dist = np.sqrt((xx - xc) ** 2 + (yy - yc) ** 2)
    else:
        dist = np.maximum(np.abs(xx - xc), np.abs(yy - yc))
    outer = dist <= r
    inner = dist <= r * 0.45
    colour = _PLATE_COLOURS[rng.integers(0, len(_PLATE_COLOURS))] + rng.uniform(-12, 12, 3)
    s.paint(outer, colour)
    s.paint(inner, _jitter(rng, (235, 235, 235), 15))
    return outer


def _draw_person(s: _Scene, xc: int, ybot: int, h: int) -> np.ndarray:
    rng, xx, yy = s.rng, s.xx, s.yy
    half_w = max(1.0, h * 0.16)
    head_r = max(1.0, h * 0.1)
    head = (xx - xc) ** 2 + (yy - (ybot - h + head_r)) ** 2 <= head_r ** 2
    torso_cy, torso_ry = ybot - h * 0.55, h * 0.25
    torso = ((xx - xc) / half_w) ** 2 + ((yy - torso_cy) / torso_ry) ** 2 <= 1.0
    legs = (np.abs(xx - xc) <= half_w * 0.7) & (yy > ybot - h * 0.35) & (yy <= ybot)
    s.paint(legs, rng.uniform(30, 90, 3))
    s.paint(torso, rng.uniform(30, 230, 3))
    s.paint(head, _SKIN_COLOURS[rng.integers(0, len(_SKIN_COLOURS))] + rng.uniform(-10, 10, 3))
    return head | torso | legs


def _draw_pole(s: _Scene, x0: int, ybot: int, w: int, h: int) -> np.ndarray:
    pole = (s.xx >= x0) & (s.xx < x0 + w) & (s.yy > ybot - h) & (s.yy <= ybot)
    s.paint(pole, _jitter(s.rng, (85, 85, 90), 20), noise=3.0)
    return pole


def _place(s: _Scene, stuff: np.ndarray, surface: int, y_lo: float, size_fn, tries: int = 30):
    """Find a spot whose bottom row and the row below lie entirely on `surface`.

    `size_fn(ybot) -> (w, h)` scales with depth; returns (x0, ybot, w, h) or None.
    """
    y_lo = int(min(max(y_lo, 0), s.h - 1))
    for _ in range(tries):
        ybot = int(s.rng.integers(y_lo, s.h))
        w, h = size_fn(ybot)
        if w >= s.w:
            continue
        x0 = int(s.rng.integers(0, s.w - w + 1))
        if np.all(stuff[ybot:ybot + 2, x0:x0 + w] == surface):
            return x0, ybot, w, h
    return None


class _Sizes:
    """Object sizes from the depth of their bottom row (0 at the horizon, 1 at the image bottom)."""

    def __init__(self, s: _Scene, horizon: float):
        self.s, self.horizon = s, horizon

    def depth(self, ybot: int) -> float:
        return float(np.clip((ybot - self.horizon) / (self.s.h - self.horizon), 0.12, 1.0))

    def vehicle(self, ybot: int):
        w = max(5, round(self.depth(ybot) * self.s.w * self.s.rng.uniform(0.16, 0.28)))
        return w, max(3, round(w * self.s.rng.uniform(0.45, 0.65)))

    def person(self, ybot: int):
        h = max(5, round(self.depth(ybot) * self.s.h * self.s.rng.uniform(0.3, 0.45)))
        return max(2, round(h * 0.35)), h

    def pole(self, ybot: int):
        d = self.depth(ybot)
        return (1 if d < 0.6 else 2), max(6, round(d * self.s.h * self.s.rng.uniform(0.6, 0.9)))

    def plate_radius(self, ybot: int) -> int:
        return max(2, round(self.depth(ybot) * self.s.h * self.s.rng.uniform(0.04, 0.07)))

    def plate(self, ybot: int):
        r = self.plate_radius(ybot)
        return 2 * r + 1, r


def _draw_things(s: _Scene, plans: list) -> None:
    """Draw planned things far to near (by bottom row), so nearer ones occlude farther ones."""
    for ybot, _, kind, args in sorted(plans, key=lambda p: (p[0], p[1])):
        if kind in (CAR, BOAT):
            x0, w, h = args
            s.label_thing(_draw_vehicle(s, x0, ybot, w, h), kind)
        elif kind == BUOY:
            x0, w, r = args
            s.label_thing(_draw_plate(s, x0 + r, ybot - r, r), BUOY)
        elif kind == PERSON:
            x0, w, h = args
            s.label_thing(_draw_person(s, x0 + w // 2, ybot, h), PERSON)
        elif kind == POLE:
            x0, w, h, sign_r = args
            s.label_thing(_draw_pole(s, x0, ybot, w, h), POLE)
            if sign_r:
                top = ybot - h + 1
                s.label_thing(_draw_plate(s, x0 + w // 2, top - sign_r + 1, sign_r), SIGN)


def _plan(s: _Scene, stuff: np.ndarray, plans: list, kind: int, surface: int, y_lo: float,
          size_fn, count: int, sizes: _Sizes, with_sign: float = 0.0) -> None:
    for _ in range(count):
        spot = _place(s, stuff, surface, y_lo, size_fn)
        if spot is None:
            continue
        x0, ybot, w, h = spot
        if kind == POLE:
            sign_r = sizes.plate_radius(ybot) if s.rng.random() < with_sign else 0
            args = (x0, w, h, sign_r)
        else:
            args = (x0, w, h)
        plans.append((ybot, len(plans), kind, args))


# ----------------------------------------------------------------------------- scenes

def _paint_street(s: _Scene) -> None:
    rng, h, w = s.rng, s.h, s.w
    horizon = h * rng.uniform(0.36, 0.5)
    s.fill(np.ones((h, w), bool), SKY, _sky_texture(s, horizon))

    # Skyline: facades of random width and height; the ground line wobbles a little.
    ground = horizon + 1.5 * _noise_1d(rng, w, 16)
    widths = rng.integers(max(4, w // 12), max(5, w // 4), w // 4 + 2)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.float32)
    block_of_col = np.searchsorted(starts, np.arange(w), side="right") - 1
    tops = (horizon - h * rng.uniform(0.04, 0.36, len(starts))).astype(np.float32)
    top_of_col = tops[block_of_col]
    building = (s.yy >= top_of_col[None, :]) & (s.yy < ground[None, :])
    s.fill(building, BUILDING, _building_texture(s, block_of_col, starts, top_of_col))

    # Sometimes street trees in front of the facades.
    if rng.random() < 0.4:
        texture = _tree_texture(s)
        for _ in range(int(rng.integers(1, 3))):
            xc = rng.uniform(0, w)
            r = h * rng.uniform(0.07, 0.13)
            yc = horizon - r * rng.uniform(1.2, 2.0)
            crown = ((s.xx - xc) / (r * 1.2)) ** 2 + ((s.yy - yc) / r) ** 2 <= 1.0
            trunk = (np.abs(s.xx - xc) <= max(1.0, r * 0.15)) & (s.yy >= yc) & (s.yy < horizon + 2)
            s.fill(crown | trunk, TREE, texture)

    # Ground: sidewalk below the ground line, road in a perspective wedge with wobbly edges.
    vx = w * rng.uniform(0.3, 0.7)
    slope = w * rng.uniform(0.3, 0.5) / (h - horizon)
    half = (s.yy - horizon) * slope + 1.5 * _noise_1d(rng, h, 10)[:, None]
    below = s.yy >= ground[None, :]
    road = below & (np.abs(s.xx - vx) < half)
    s.fill(below & ~road, SIDEWALK, _sidewalk_texture(s))
    s.fill(road, ROAD, _road_texture(s))

    stuff = s.lab.copy()
    sizes = _Sizes(s, horizon)
    plans: list = []
    near = horizon + 0.12 * (h - horizon)
    _plan(s, stuff, plans, CAR, ROAD, near, sizes.vehicle, int(rng.integers(1, 5)), sizes)
    _plan(s, stuff, plans, PERSON, SIDEWALK, near, sizes.person, int(rng.integers(0, 4)), sizes)
    _plan(s, stuff, plans, POLE, SIDEWALK, near, sizes.pole, int(rng.integers(1, 4)), sizes,
          with_sign=0.6)
    _draw_things(s, plans)


def _paint_harbour(s: _Scene) -> None:
    rng, h, w = s.rng, s.h, s.w
    horizon = h * rng.uniform(0.36, 0.5)
    s.fill(np.ones((h, w), bool), SKY, _sky_texture(s, horizon))

    # Hills (trees and/or grass) between a ridge line and a shoreline, water below.
    ridge = horizon - h * rng.uniform(0.03, 0.12) - h * 0.06 * (_noise_1d(rng, w, 20) + 1)
    shore = horizon + h * rng.uniform(0.02, 0.08) + h * 0.025 * _noise_1d(rng, w, 14)
    land = (s.yy >= ridge[None, :]) & (s.yy < shore[None, :])
    grass = _grass_texture(s)
    s.fill(land, GRASS, grass)
    if rng.random() < 0.75:
        treeline = ridge + (shore - ridge) * rng.uniform(0.5, 0.9) + h * 0.02 * _noise_1d(rng, w, 8)
        s.fill(land & (s.yy < treeline[None, :]), TREE, _tree_texture(s))
    s.fill(s.yy >= shore[None, :], WATER, _water_texture(s))
    # Sometimes a grassy bank in the foreground.
    if rng.random() < 0.5:
        bank = h * rng.uniform(0.82, 0.95) + h * 0.04 * _noise_1d(rng, w, 12)
        s.fill(s.yy >= bank[None, :], GRASS, grass)

    stuff = s.lab.copy()
    sizes = _Sizes(s, horizon)
    plans: list = []
    near = horizon + 0.12 * (h - horizon)
    _plan(s, stuff, plans, BOAT, WATER, near, sizes.vehicle, int(rng.integers(1, 5)), sizes)
    _plan(s, stuff, plans, BUOY, WATER, near, sizes.plate, int(rng.integers(0, 4)), sizes)
    _plan(s, stuff, plans, PERSON, GRASS, horizon, sizes.person, int(rng.integers(0, 3)), sizes)
    _plan(s, stuff, plans, POLE, GRASS, horizon, sizes.pole, int(rng.integers(0, 3)), sizes)
    _draw_things(s, plans)


def _apply_lighting(s: _Scene) -> np.ndarray:
    """Scene-level gain, colour tint and a left-right ramp (sun side); returns uint8 RGB."""
    rng = s.rng
    gain = rng.uniform(0.6, 1.3)
    tint = 1.0 + rng.uniform(-0.08, 0.08, 3).astype(np.float32)
    ramp = 1.0 + rng.uniform(-0.3, 0.3) * (s.xx / s.w - 0.5)
    img = s.img * (gain * tint) * ramp[..., None] + s.grain(2.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(seed: int, split: str, index: int, width: int, height: int):
    """Draw one scene; returns (image uint8 HxWx3, label uint8 HxW). Pure in its arguments."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    s = _Scene(rng, height, width)
    if rng.random() < 0.5:
        _paint_street(s)
    else:
        _paint_harbour(s)
    return _apply_lighting(s), s.lab


# ----------------------------------------------------------------------------- on disk


def _check_args(root: Path, name, seed, width, height, train, val) -> None:
    def need_int(label, value, minimum):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise SegreproError(f"{root}: generator {label} must be an integer >= {minimum}, got {value!r}")

    if not isinstance(name, str) or not name:
        raise SegreproError(f"{root}: dataset name must be a non-empty string, got {name!r}")
    need_int("seed", seed, 0)
    need_int("width", width, MIN_WIDTH)
    need_int("height", height, MIN_HEIGHT)
    need_int("train", train, 1)
    need_int("val", val, 1)


def generate_dataset(root, name: str, seed: int, width: int, height: int,
                     train: int, val: int) -> Path:
    """Write a synthetic dataset in the uniform layout at `root` and return `root`.

    Files go to a sibling temp folder first; dataset.yaml is written last and the folder is
    renamed into place at the end, so an interrupted run never leaves a root that looks complete.
    """
    root = Path(root)
    _check_args(root, name, seed, width, height, train, val)
    check_replaceable(root)
    with atomic.build_directory(root) as tmp:
        for sub in ("images", "labels", "splits"):
            (tmp / sub).mkdir(parents=True)
        for split, count in (("train", train), ("val", val)):
            ids = []
            for index in range(count):
                image, label = render_scene(seed, split, index, width, height)
                image_id = f"{split}_{index:05d}"
                Image.fromarray(image).save(tmp / "images" / f"{image_id}.png")
                Image.fromarray(label).save(tmp / "labels" / f"{image_id}.png")
                ids.append(image_id)
            (tmp / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        card = {
            "name": name,
            "num_classes": len(CLASS_NAMES),
            "ignore_index": IGNORE_INDEX,
            "class_names": list(CLASS_NAMES),
            "image_suffix": ".png",
            "label_suffix": ".png",
            "splits": {"train": int(train), "val": int(val)},
            "source": f"generated by segrepro.data.synthetic, seed {seed}",
            "generator": {
                "module": "segrepro.data.synthetic",
                "version": GENERATOR_VERSION,
                "seed": int(seed),
                "width": int(width),
                "height": int(height),
                "train": int(train),
                "val": int(val),
                "scene_types": ["street", "harbour"],
            },
        }
        (tmp / CARD).write_text(yaml.safe_dump(card, sort_keys=False))
    return root
