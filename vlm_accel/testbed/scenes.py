"""Scene sampling and rendering for the procedural visual-QA testbed.

A scene is a 256×256 RGB image on a 16×16 grid of 16-px cells (one cell = one CLIP patch = one visual token).
Each object (shape × colour × size) lies strictly inside one cell, so exactly one visual token carries it and the
other 255 tokens show only the textured background. This locality is deliberate: it makes which visual tokens a
pruning method keeps matter, as in real VLMs (see ``docs/testbed.md``).

The training distribution has a deliberate co-occurrence bias (anchor → partner pairs), so a language prior can form
and object hallucination is measurable (POPE-style "adversarial" probes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 2

IMAGE_SIZE = 256
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE  # 16 cells per side → 256 visual tokens
NUM_PATCHES = GRID * GRID
MAX_OBJECTS = 8
MAX_COUNT = 5

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, tuple[int, int]] = {"small": (4, 5), "large": (6, 6)}  # radius range in px (inclusive)
QUADRANTS: tuple[str, ...] = ("topleft", "topright", "bottomleft", "bottomright")

# Co-occurrence bias: each anchor appears with probability ANCHOR_P; its partner then follows with PARTNER_P.
# Anchor and partner types appear in scenes *only* through this mechanism.
COOCCUR_PAIRS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("red", "circle"), ("blue", "square")),
    (("green", "triangle"), ("yellow", "diamond")),
    (("purple", "cross"), ("orange", "circle")),
)
ANCHOR_P = 0.25
PARTNER_P = 0.9

ALL_TYPES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)
# a tuple, not a set: code that draws from it must see one order in every process (set order follows the
# per-process string hash seed)
PAIR_TYPES: tuple[tuple[str, str], ...] = tuple(t for pair in COOCCUR_PAIRS for t in pair)
FREE_TYPES: tuple[tuple[str, str], ...] = tuple(t for t in ALL_TYPES if t not in PAIR_TYPES)


def type_index(color: str, shape: str) -> int:
    """Class index of an object type (0..29); 30 is reserved for background in auxiliary labels."""
    return COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class SceneObject:
    """One object: its type, size, grid cell, pixel centre/radius and bounding box (x0, y0, x1, y1 inclusive)."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: int
    cy: int
    radius: int
    rgb: tuple[int, int, int]
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def patch(self) -> int:
        """Index of the visual token (row-major over the 16×16 grid) that holds this object."""
        return self.row * GRID + self.col

    @property
    def quadrant(self) -> str:
        top = self.row < GRID // 2
        left = self.col < GRID // 2
        return ("top" if top else "bottom") + ("left" if left else "right")


@dataclass
class Scene:
    """A full scene: background parameters and objects. ``to_json`` is the dataset's ``spec`` column."""

    objects: list[SceneObject]
    background_seed: int
    tint: tuple[int, int, int]
    version: int = GENERATOR_VERSION
    extra: dict = field(default_factory=dict)

    def count(self, *, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            1 for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)
        )

    def has(self, color: str, shape: str) -> bool:
        return self.count(shape=shape, color=color) > 0

    def object_patches(self) -> list[int]:
        return sorted(o.patch for o in self.objects)

    def to_json(self) -> str:
        d = asdict(self)
        for o, od in zip(self.objects, d["objects"]):
            od["patch"] = o.patch
            od["quadrant"] = o.quadrant
        d["grid"] = GRID
        d["patch_size"] = PATCH_SIZE
        d["image_size"] = IMAGE_SIZE
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_json(s: str) -> Scene:
        d = json.loads(s)
        objs = []
        for od in d["objects"]:
            od = {k: v for k, v in od.items() if k not in ("patch", "quadrant")}
            od["rgb"] = tuple(od["rgb"])
            od["bbox"] = tuple(od["bbox"])
            objs.append(SceneObject(**od))
        return Scene(
            objects=objs,
            background_seed=d["background_seed"],
            tint=tuple(d["tint"]),
            version=d["version"],
            extra=d.get("extra", {}),
        )


def _make_object(rng: np.random.Generator, color: str, shape: str, cell: int) -> SceneObject:
    size = str(rng.choice(list(SIZES)))
    lo, hi = SIZES[size]
    radius = int(rng.integers(lo, hi + 1))
    row, col = divmod(int(cell), GRID)
    jitter = PATCH_SIZE // 2 - 1 - radius  # keep the object strictly inside its cell
    cx = col * PATCH_SIZE + PATCH_SIZE // 2 + int(rng.integers(-jitter, jitter + 1)) if jitter > 0 else None
    cy = row * PATCH_SIZE + PATCH_SIZE // 2 + int(rng.integers(-jitter, jitter + 1)) if jitter > 0 else None
    if cx is None:
        cx = col * PATCH_SIZE + PATCH_SIZE // 2
        cy = row * PATCH_SIZE + PATCH_SIZE // 2
    base = np.array(COLORS[color])
    rgb = tuple(int(v) for v in np.clip(base + rng.integers(-20, 21, size=3), 0, 255))
    bbox = (cx - radius, cy - radius, cx + radius, cy + radius)
    return SceneObject(shape, color, size, row, col, cx, cy, radius, rgb, bbox)


def sample_types(
    rng: np.random.Generator,
    n_objects: int | None = None,
    count_target: tuple[str, str, int] | None = None,
) -> list[tuple[str, str]]:
    """Sample the (colour, shape) types of a scene, with the co-occurrence bias.

    ``count_target=(kind, value, c)`` (kind "shape" or "color") asks for exactly ``c`` objects with that attribute
    among the free (non-pair) objects when possible; the true count is always re-derived from the final scene.
    """
    if n_objects is None:
        lo = max(1, count_target[2]) if count_target else 1
        n_objects = int(rng.integers(lo, MAX_OBJECTS + 1))
    types: list[tuple[str, str]] = []
    for anchor, partner in COOCCUR_PAIRS:
        if len(types) < n_objects and rng.random() < ANCHOR_P:
            types.append(anchor)
            if len(types) < n_objects and rng.random() < PARTNER_P:
                types.append(partner)
    free = [FREE_TYPES[int(i)] for i in rng.integers(0, len(FREE_TYPES), size=n_objects - len(types))]
    types.extend(free)
    if count_target is not None:
        kind, value, c = count_target
        idx = 1 if kind == "shape" else 0

        def matches(t: tuple[str, str]) -> bool:
            return t[idx] == value

        match_free = [t for t in FREE_TYPES if matches(t)]
        other_free = [t for t in FREE_TYPES if not matches(t)]
        n_pair = len(types) - len(free)
        cur = sum(matches(t) for t in types)
        free_pos = list(range(n_pair, len(types)))
        rng.shuffle(free_pos)
        for i in free_pos:  # adjust free objects towards the target count
            if cur > c and matches(types[i]):
                types[i] = other_free[int(rng.integers(len(other_free)))]
                cur -= 1
            elif cur < c and not matches(types[i]):
                types[i] = match_free[int(rng.integers(len(match_free)))]
                cur += 1
        for i in range(n_pair - 1, -1, -1):  # not enough free slots: give up co-occurring objects (rare)
            if cur >= c:
                break
            if not matches(types[i]):
                types[i] = match_free[int(rng.integers(len(match_free)))]
                cur += 1
    return types


def build_scene(rng: np.random.Generator, types: list[tuple[str, str]]) -> Scene:
    """Place the given object types in distinct random cells and draw the background parameters."""
    cells = rng.choice(NUM_PATCHES, size=len(types), replace=False)
    objects = [_make_object(rng, c, s, cell) for (c, s), cell in zip(types, cells)]
    order = rng.permutation(len(objects))
    objects = [objects[int(i)] for i in order]
    tint = tuple(int(v) for v in rng.integers(195, 246, size=3))
    return Scene(objects=objects, background_seed=int(rng.integers(0, 2**31 - 1)), tint=tint)


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    count_target: tuple[str, str, int] | None = None,
) -> Scene:
    """Sample object types (with the co-occurrence bias) and lay them out: see :func:`sample_types`."""
    return build_scene(rng, sample_types(rng, n_objects, count_target))


def render_background(scene: Scene) -> np.ndarray:
    """Light tinted background with low-frequency smooth noise and pixel noise (uint8, H×W×3)."""
    rng = np.random.default_rng(scene.background_seed)
    coarse = rng.normal(0.0, 8.0, size=(5, 5, 3))
    # bilinear upsampling of a 5×5 grid to the full image
    xs = np.linspace(0, 4, IMAGE_SIZE)
    i0 = np.clip(np.floor(xs).astype(int), 0, 3)
    f = (xs - i0)[:, None]
    rows = coarse[i0] * (1 - f)[:, :, None] + coarse[i0 + 1] * f[:, :, None]  # (H, 5, 3)
    smooth = rows[:, i0] * (1 - f.T)[:, :, None] + rows[:, i0 + 1] * f.T[:, :, None]  # (H, W, 3)
    fine = rng.standard_normal(size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32) * 3.0
    img = np.asarray(scene.tint, dtype=np.float32)[None, None, :] + smooth.astype(np.float32) + fine
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject) -> None:
    cx, cy, r, fill = o.cx, o.cy, o.radius, o.rgb
    if o.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif o.shape == "square":
        h = max(2, int(round(r * 0.85)))
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif o.shape == "cross":
        t = max(1, int(round(r * 0.35)))
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {o.shape!r}")


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 256×256 RGB PIL image (deterministic given the scene)."""
    img = Image.fromarray(render_background(scene), mode="RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_object(draw, o)
    return img


def object_mask(scene: Scene) -> np.ndarray:
    """Boolean (256,) mask over visual tokens: True where a token's cell holds an object."""
    m = np.zeros(NUM_PATCHES, dtype=bool)
    m[scene.object_patches()] = True
    return m
