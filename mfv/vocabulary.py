"""The built-in object names: one vocabulary shared by the data and the tiny models' tokenizers.

Lives outside both ``mfv.data`` and ``mfv.models`` so that neither imports the other: the
synthetic objects are drawn under these names (:mod:`mfv.data.objects`) and the word-level
tokenizers of random and tiny models give each of them one token.
The first :data:`NUM_TRAIN_OBJECTS` are training objects, the rest are held out.
"""

OBJECT_NAMES: tuple[str, ...] = (
    "apple",
    "ball",
    "banana",
    "bell",
    "book",
    "bowl",
    "box",
    "cake",
    "car",
    "chair",
    "clock",
    "coin",
    "cup",
    "dog",
    "door",
    "drum",
    "egg",
    "fish",
    "flag",
    "hat",
    "key",
    "kite",
    "lamp",
    "leaf",
    "lemon",
    "moon",
    "pear",
    "pen",
    "pipe",
    "ring",
    "rock",
    "shoe",
    "sock",
    "sofa",
    "star",
    "sun",
    "tent",
    "tree",
    "vase",
    "boat",
    "bird",
    "cross",
)
NUM_TRAIN_OBJECTS = 32
