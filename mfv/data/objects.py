"""Object libraries for the synthetic scenes: built-in procedural objects or a folder of PNGs.

The built-in library has 32 training and 10 held-out objects, each a distinct
shape/colour pair named by a common single-token English word. A folder library
reads ``DIR/train/*.png`` and ``DIR/heldout/*.png`` (RGBA, file stem = object name),
or a flat ``DIR/*.png`` that has training objects only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw

from mfv.errors import DataError
from mfv.vocabulary import NUM_TRAIN_OBJECTS, OBJECT_NAMES

# name -> (shape, colour, aspect); aspect > 1 marks long objects (width / height).
_LOOKS: dict[str, tuple[str, str, float]] = {
    "apple": ("circle", "#d62728", 1.0),
    "ball": ("ring", "#1f77b4", 1.0),
    "banana": ("ellipse", "#e6c300", 2.2),
    "bell": ("triangle", "#bcbd22", 1.0),
    "book": ("square", "#8c564b", 1.0),
    "bowl": ("halfdisc", "#17becf", 1.6),
    "box": ("square", "#ff7f0e", 1.0),
    "cake": ("square", "#e377c2", 1.3),
    "car": ("rect", "#2ca02c", 2.0),
    "chair": ("cross", "#7f7f7f", 1.0),
    "clock": ("ring", "#9467bd", 1.0),
    "coin": ("circle", "#c5b000", 1.0),
    "cup": ("trapezoid", "#aec7e8", 1.0),
    "dog": ("hexagon", "#a0522d", 1.0),
    "door": ("rect", "#6b3e26", 0.5),
    "drum": ("hexagon", "#d62728", 1.0),
    "egg": ("ellipse", "#f3e9c6", 0.75),
    "fish": ("diamond", "#ff9896", 1.8),
    "flag": ("triangle", "#2ca02c", 1.0),
    "hat": ("trapezoid", "#111111", 1.4),
    "key": ("rect", "#c49c94", 2.6),
    "kite": ("diamond", "#e377c2", 0.8),
    "lamp": ("triangle", "#ffbb78", 1.0),
    "leaf": ("ellipse", "#2ca02c", 1.6),
    "lemon": ("ellipse", "#f0e442", 1.3),
    "moon": ("halfdisc", "#c7c7c7", 1.6),
    "pear": ("circle", "#98df8a", 1.0),
    "pen": ("rect", "#1f77b4", 3.0),
    "pipe": ("rect", "#7f7f7f", 2.8),
    "ring": ("ring", "#ffd700", 1.0),
    "rock": ("hexagon", "#8c8c8c", 1.0),
    "shoe": ("trapezoid", "#8c564b", 1.8),
    # held out (never trained)
    "sock": ("rect", "#9467bd", 0.5),
    "sofa": ("rect", "#d62728", 2.0),
    "star": ("star", "#ffbf00", 1.0),
    "sun": ("star", "#ff7f0e", 1.0),
    "tent": ("triangle", "#17becf", 1.3),
    "tree": ("triangle", "#1b5e20", 0.8),
    "vase": ("trapezoid", "#9467bd", 0.7),
    "boat": ("halfdisc", "#1f77b4", 2.0),
    "bird": ("diamond", "#17becf", 1.0),
    "cross": ("cross", "#d62728", 1.0),
}
_BUILTIN: tuple[tuple[str, str, str, float], ...] = tuple((name, *_LOOKS[name]) for name in OBJECT_NAMES)
NUM_TRAIN_BUILTIN = NUM_TRAIN_OBJECTS
LONG_ASPECT = 1.5


@dataclass(frozen=True)
class ObjectSprite:
    """A drawable object. ``path`` is set for photo objects, else it is drawn procedurally."""

    name: str
    shape: str = "circle"
    colour: str = "#000000"
    aspect: float = 1.0
    path: str | None = None
    long_side: float | None = None  # fixed long side on the 800-px canvas (photos); None: drawn per placement

    @property
    def is_long(self) -> bool:
        return max(self.aspect, 1 / self.aspect) >= LONG_ASPECT

    def render(self, long_side: int, rotate: bool = False) -> Image.Image:
        """An RGBA image of the object whose longer side is ``long_side`` pixels."""
        if self.path is not None:
            image = _load_png(self.path)
            image = image.crop(image.getchannel("A").getbbox() or (0, 0, *image.size))  # the opaque object only
            scale = long_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        else:
            image = _draw(self.shape, self.colour, self.aspect, long_side)
        return image.rotate(90, expand=True) if rotate else image


@lru_cache(maxsize=256)
def _load_png(path: str) -> Image.Image:
    return Image.open(path).convert("RGBA")


def _draw(shape: str, colour: str, aspect: float, long_side: int) -> Image.Image:
    if aspect >= 1:
        width, height = long_side, max(2, round(long_side / aspect))
    else:
        width, height = max(2, round(long_side * aspect)), long_side
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    w, h = width - 1, height - 1
    edge = max(1, long_side // 20)
    if shape == "circle" or shape == "ellipse":
        draw.ellipse((0, 0, w, h), fill=colour)
    elif shape == "ring":
        draw.ellipse((0, 0, w, h), outline=colour, width=max(2, long_side // 6))
    elif shape in ("square", "rect"):
        draw.rectangle((0, 0, w, h), fill=colour, outline="#000000", width=edge)
    elif shape == "triangle":
        draw.polygon([(w / 2, 0), (w, h), (0, h)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(w / 2, 0), (w, h / 2), (w / 2, h), (0, h / 2)], fill=colour)
    elif shape == "trapezoid":
        draw.polygon([(0, 0), (w, 0), (0.8 * w, h), (0.2 * w, h)], fill=colour)
    elif shape == "halfdisc":
        draw.pieslice((0, -h, w, h), 0, 180, fill=colour)
    elif shape == "hexagon":
        draw.polygon([(w / 2 + w / 2 * math.cos(a), h / 2 + h / 2 * math.sin(a)) for a in
                      (k * math.pi / 3 for k in range(6))], fill=colour)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = 0.5 if k % 2 == 0 else 0.22
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((w / 2 + radius * w * math.cos(angle), h / 2 + radius * h * math.sin(angle)))
        draw.polygon(points, fill=colour)
    elif shape == "cross":
        draw.rectangle((w * 0.35, 0, w * 0.65, h), fill=colour)
        draw.rectangle((0, h * 0.35, w, h * 0.65), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


@dataclass(frozen=True)
class ObjectLibrary:
    """Training objects and held-out objects (used only by the ``novel`` split)."""

    train: tuple[ObjectSprite, ...]
    heldout: tuple[ObjectSprite, ...]
    source: str = "builtin"

    def names(self) -> list[str]:
        return [o.name for o in (*self.train, *self.heldout)]


def builtin_library() -> ObjectLibrary:
    """The 32 + 10 procedural objects."""
    sprites = tuple(ObjectSprite(name, shape, colour, aspect) for name, shape, colour, aspect in _BUILTIN)
    return ObjectLibrary(sprites[:NUM_TRAIN_BUILTIN], sprites[NUM_TRAIN_BUILTIN:])


def all_object_names() -> list[str]:
    """Every built-in object name (training first, then held-out)."""
    return list(OBJECT_NAMES)


PHOTO_LONG_SIDE = 200.0  # the authors' most common long side (800-px canvas)


def _folder_sprites(folder: Path) -> tuple[ObjectSprite, ...]:
    """Photo objects: aspect from the opaque bounding box (so long objects are rotated when
    placed above/below, as the built-ins are) and a fixed long side per object: 200 px, or the
    object's entry in an optional ``sizes.json`` (name -> long side, 130-230 in the paper)."""
    sizes_file = folder / "sizes.json"
    sizes: dict = {}
    if sizes_file.is_file():
        try:
            sizes = json.loads(sizes_file.read_text())
            assert isinstance(sizes, dict) and all(isinstance(v, (int, float)) and v > 0 for v in sizes.values())
        except (ValueError, AssertionError) as exc:
            raise DataError(f"{sizes_file}: must map object names to positive long sides in pixels") from exc
    sprites = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != "sizes.json"):
        if path.suffix.lower() != ".png":
            raise DataError(f"{path}: not a PNG; the objects folder must hold only RGBA PNGs named by object")
        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                box = image.convert("RGBA").getchannel("A").getbbox()
        except Exception as exc:
            raise DataError(f"{path}: unreadable image ({exc}); replace or remove it") from exc
        if box is None:
            raise DataError(f"{path}: fully transparent; the object needs opaque pixels")
        name = path.stem.strip().lower()
        if not name.isalpha():
            raise DataError(f"{path}: object names must be single words of letters (got {path.stem!r})")
        aspect = (box[2] - box[0]) / max(1, box[3] - box[1])
        sprites.append(ObjectSprite(name=name, aspect=aspect, path=str(path),
                                    long_side=float(sizes.get(name, PHOTO_LONG_SIDE))))
    return tuple(sprites)


def folder_library(directory: str | Path, min_train: int) -> ObjectLibrary:
    """Reads an object library from ``directory`` (see module docstring).

    Args:
        directory: The objects folder.
        min_train: Fewest training objects the requested split needs.

    Raises:
        DataError: missing folder, non-PNG or unreadable files, bad names, or too few objects.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"objects folder {directory} does not exist")
    if (directory / "train").is_dir():
        train = _folder_sprites(directory / "train")
        heldout = _folder_sprites(directory / "heldout") if (directory / "heldout").is_dir() else ()
    else:
        train, heldout = _folder_sprites(directory), ()
    if len(train) < min_train:
        raise DataError(
            f"objects folder {directory} has {len(train)} training objects; this split needs at least {min_train} "
            f"(an anchor, its neighbours and a distractor, all different)"
        )
    names = [s.name for s in (*train, *heldout)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"objects folder {directory}: names used twice: {duplicates}")
    return ObjectLibrary(train, heldout, source=str(directory))
