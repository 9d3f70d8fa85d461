"""A procedural visual world small enough to train Flamingo on two CPU cores.

Images are coloured shapes on noisy backgrounds; videos are ten-second clips of one shape that
slides left, right, up or down, or that becomes another colour partway through, so only the order
of their frames tells the answer; text is captions, questions and answers,
and few-shot episodes that bind made-up label words (pairs of syllables, like "dako") to
items for the length of one episode. Some colour-shape combinations and some label words
are held out of every training set, text included, so evaluation can measure what the
model does with things it has never seen.

Everything is a pure function of a seed: the same seed draws the same image, caption and
episode on any machine.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 35, 35), "green": (40, 185, 60), "blue": (45, 80, 235), "yellow": (240, 225, 40),
    "purple": (155, 60, 210), "orange": (250, 145, 25), "pink": (250, 130, 195), "cyan": (50, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# One combination per colour, each shape at most twice: every colour and every shape is still
# seen in training, only these pairings are not.
HELD_OUT_COMBOS = {("red", "star"), ("green", "diamond"), ("blue", "triangle"), ("yellow", "cross"),
                   ("purple", "circle"), ("orange", "square")}
TRAIN_COMBOS = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_COMBOS]
TEST_COMBOS = sorted(HELD_OUT_COMBOS)

CONSONANTS = "bdfgkmnprstvz"
VOWELS = "aeiou"
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS]
IMAGE_SIZE = 32

QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QUESTIONS = {"direction": "Which way does it slide?", "becomes": "What colour does it become?"}
# Ten seconds at 3 FPS: the paper's evaluation sampling (30 frames at 3 FPS) reads every frame,
# its training sampling (8 frames at 1 FPS) a random eight-second window.
VIDEO_FRAMES, VIDEO_FPS = 30, 3
# Every word the world writes, for the tokenizer's vocabulary. None is two consonant-vowel
# syllables, so adding words never changes the label words.
WORDS = ["a", "an", "is", "the", "of", "and", "this", "This", "picture", "shows", "Output", "Question", "Answer",
         "What", "colour", "shape", "it", "here", "Here", "page", "pictures", "A", "with", "on",
         *COLOURS, *SHAPES, ".", ",", ":", "?",
         "Which", "way", "does", "slide", "slides", *DIRECTIONS, "become", "becomes",
         "at", "top", "centre", "bottom", "middle"]
# Where a shape is, in thirds of the image, for the contrastive stage's captions only: captions
# without it leave the encoder's tokens nearly blind to position (a linear probe locates the
# shape 5x worse), and a slide's direction is a change of position.
ROWS, COLUMNS = ("top", "centre", "bottom"), ("left", "middle", "right")


def _label_words() -> tuple[list[str], list[str], list[str]]:
    """Two-syllable nonsense words, split once and for all into training and held-out sets,
    and every word not held out, for the LM's text."""
    words = sorted({a + b for a in SYLLABLES for b in SYLLABLES if a != b} - set(WORDS))
    random.Random(1234).shuffle(words)
    return words[:400], words[400:600], words[:400] + words[600:]


# The LM's episodes bind words from thousands, not the 400 of the documents: over only those,
# an LM can learn each one's second syllable from its first instead of copying it from the
# context, and then turns a held-out "veni" into a training word "veso".
TRAIN_LABELS, HELD_OUT_LABELS, TEXT_LABELS = _label_words()


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Item:
    colour: str
    shape: str
    seed: int  # draws position, size, rotation, background and noise

    @property
    def caption(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape}"

    def answer(self, task: str) -> str:
        """The answer for a task: caption, colour or shape."""
        return {"caption": self.caption, "colour": self.colour, "shape": self.shape}[task]

    @property
    def centre(self) -> tuple[float, float]:
        """The shape's centre (x, y) as fractions of the image's width and height."""
        big = IMAGE_SIZE * 4
        _, _, cx, cy = _placement(random.Random(self.seed), big)
        return cx / big, cy / big

    @property
    def place(self) -> str:
        """Where the shape's centre is, in thirds: "top left", "centre middle", "bottom right"..."""
        x, y = self.centre
        return f"{ROWS[min(2, int(3 * y))]} {COLUMNS[min(2, int(3 * x))]}"

    @property
    def located_caption(self) -> str:
        return f"{self.caption} at the {self.place}"

    def image(self) -> Image.Image:
        return draw(self.colour, self.shape, self.seed)


def random_item(rng: random.Random, combos=TRAIN_COMBOS) -> Item:
    colour, shape = rng.choice(combos)
    return Item(colour, shape, rng.getrandbits(32))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    def ring(n, radii, offset=0.0):
        return [(cx + rad * math.cos(offset + angle + 2 * math.pi * i / n),
                 cy + rad * math.sin(offset + angle + 2 * math.pi * i / n)) for i, rad in enumerate(radii)]

    if shape == "square":
        return ring(4, [r * 1.15] * 4, math.pi / 4)
    if shape == "diamond":
        return [(cx, cy - r * 1.2), (cx + r * 0.8, cy), (cx, cy + r * 1.2), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return ring(3, [r * 1.2] * 3, -math.pi / 2)
    if shape == "star":
        return ring(10, [r * 1.25, r * 0.5] * 5, -math.pi / 2)
    if shape == "cross":
        a, b = r * 1.1, r * 0.38
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    return None  # circle


def _background(rng: random.Random) -> tuple[int, int, int]:
    grey = rng.randint(15, 95)
    return tuple(max(0, min(255, grey + rng.randint(-18, 18))) for _ in range(3))


def _fill(rng: random.Random, colour: str) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[colour])


def _render(background, fill, shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> Image.Image:
    """The shape drawn at 4x on a plain background and downsampled, so edges are antialiased."""
    image = Image.new("RGB", (size * 4, size * 4), background)
    pen = ImageDraw.Draw(image)
    points = _polygon(shape, cx, cy, r, angle)
    if points is None:
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon(points, fill=fill)
    return image.resize((size, size), Image.BILINEAR)


def _noisy(image: Image.Image, noise: random.Random, sigma: float) -> Image.Image:
    data = bytes(max(0, min(255, int(v + noise.gauss(0, sigma)))) for v in image.tobytes())
    return Image.frombytes("RGB", image.size, data)


def _placement(rng: random.Random, big: int) -> tuple[tuple[int, int, int], float, float, float]:
    """An image's background, and its shape's radius and centre, in pixels of the 4x canvas."""
    background = _background(rng)
    r = rng.uniform(0.2, 0.34) * big
    return background, r, rng.uniform(r * 1.2, big - r * 1.2), rng.uniform(r * 1.2, big - r * 1.2)


def draw(colour: str, shape: str, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """One image: the shape at a random place, size and slight rotation, on a dark, tinted,
    noisy background."""
    rng = random.Random(seed)
    background, r, cx, cy = _placement(rng, size * 4)
    fill = _fill(rng, colour)
    image = _render(background, fill, shape, cx, cy, r, rng.uniform(-0.2, 0.2), size)
    # Pixel noise from the same seed, so an image is a pure function of its Item.
    return _noisy(image, random.Random(seed ^ 0x5EED), rng.uniform(3, 12))


@dataclass(frozen=True)
class Clip:
    """A video of one shape: it slides `direction` across the frame, or, standing still, becomes
    the colour `becomes` at a frame in the middle third."""
    colour: str
    shape: str
    seed: int
    direction: str | None = None
    becomes: str | None = None

    @property
    def task(self) -> str:
        return "direction" if self.direction else "becomes"

    @property
    def caption(self) -> str:
        change = f"slides {self.direction}" if self.direction else f"becomes {self.becomes}"
        return f"{article(self.colour)} {self.colour} {self.shape} {change}"

    def answer(self, task: str) -> str:
        """The answer for a task: caption, direction or becomes."""
        return {"caption": self.caption, "direction": self.direction, "becomes": self.becomes}[task]

    def frames(self, size: int = IMAGE_SIZE) -> list[Image.Image]:
        rng = random.Random(self.seed)
        big = size * 4
        background = _background(rng)
        r = rng.uniform(0.16, 0.22) * big
        lo, hi = r * 1.2, big - r * 1.2
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        angle = rng.uniform(-0.2, 0.2)
        fills = [_fill(rng, self.colour), _fill(rng, self.becomes or self.colour)]
        change = rng.randint(VIDEO_FRAMES // 3, 2 * VIDEO_FRAMES // 3)
        sigma = rng.uniform(3, 12)
        dx, dy = DIRECTIONS.get(self.direction, (0, 0))
        # numpy's noise, not the images' per-pixel Python loop: a clip has 30 frames
        noise = np.random.Generator(np.random.PCG64(self.seed)).normal(0, sigma, (VIDEO_FRAMES, size, size, 3))
        frames = []
        for t in range(VIDEO_FRAMES):
            along = lo + (hi - lo) * t / (VIDEO_FRAMES - 1)  # from one side to the other
            x = (along if dx > 0 else lo + hi - along) if dx else cx
            y = (along if dy > 0 else lo + hi - along) if dy else cy
            image = np.asarray(_render(background, fills[t >= change], self.shape, x, y, r, angle, size), float)
            frames.append(Image.fromarray(np.clip(image + noise[t], 0, 255).astype(np.uint8)))
        return frames

    def write(self, path, crf: int = 4) -> None:
        """The clip as an H.264 MP4 at VIDEO_FPS (by default near-lossless: colours survive)."""
        import av

        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=VIDEO_FPS, options={"crf": str(crf)})
            stream.width = stream.height = IMAGE_SIZE
            stream.pix_fmt = "yuv444p"
            for image in self.frames():
                out.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")))
            out.mux(stream.encode())


def random_clip(rng: random.Random, combos=TRAIN_COMBOS) -> Clip:
    colour, shape = rng.choice(combos)
    if rng.random() < 0.5:
        return Clip(colour, shape, rng.getrandbits(32), direction=rng.choice(list(DIRECTIONS)))
    # The colour it becomes keeps the shape a training combination too: held-out ones never show.
    after = [c for c in COLOURS if c != colour and (c, shape) in combos]
    return Clip(colour, shape, rng.getrandbits(32), becomes=rng.choice(after))


def clip_text(rng: random.Random, clip: Clip) -> str:
    """A video-text pair's text: its caption, or its question and answer."""
    if rng.random() < 0.5:
        return clip.caption
    return f"Question: {VIDEO_QUESTIONS[clip.task]} Answer: {clip.answer(clip.task)}"


# -- the tokenizer -------------------------------------------------------------------------

def build_tokenizer():
    """A WordPiece tokenizer over the world's words and syllables, built here, not trained.

    World words are whole tokens; label words split into syllables ("dako" -> "da", "##ko"),
    so a held-out label word is a new combination of syllables the LM has seen, never an
    unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>", *dict.fromkeys(WORDS), *SYLLABLES, *(f"##{s}" for s in SYLLABLES)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=True)


# -- text for the language model ------------------------------------------------------------

def text_episode(rng: random.Random, labels=TRAIN_LABELS, combos=TRAIN_COMBOS, ways: int | None = None,
                 shots: int | None = None) -> tuple[str, str, list[str]]:
    """A text-only few-shot episode: made-up words bound to items for this episode only.
    Returns (context ending where the answer goes, answer, the episode's label words)."""
    ways = ways or rng.choice([2, 2, 3, 4])
    shots = shots if shots is not None else rng.randint(ways, 8)
    classes = rng.sample(combos, ways)
    words = rng.sample(labels, ways)
    order = [i % ways for i in range(ways)] + [rng.randrange(ways) for _ in range(max(0, shots - ways))]
    rng.shuffle(order)
    query = rng.choice(order) if order else rng.randrange(ways)
    fmt = rng.choice(TEXT_EPISODE_FORMATS)
    context = " ".join(fmt.format(item=" ".join(classes[i]), label=words[i]) + " ." for i in order[:shots])
    prompt = (context + " " + fmt.format(item=" ".join(classes[query]), label="")).strip()
    return prompt, words[query], words


# Several phrasings, the first with the label right after the item: the easy case for the
# induction heads the repeated-span data grows, the others need them to look further back.
TEXT_EPISODE_FORMATS = ("{item} {label}", "{item} is a {label}", "this {item} is a {label}", "{item} Output: {label}")


def repeated_span(rng: random.Random, vocabulary: list[str]) -> str:
    """Random tokens, then the same tokens again: the data that grows induction heads."""
    span = [rng.choice(vocabulary) for _ in range(rng.randint(4, 16))]
    return " ".join(span + ["."] + span[: rng.randint(len(span) // 2, len(span))])


def world_text(rng: random.Random) -> str:
    """Captions, questions and task documents of the world, in the prompt formats."""
    if rng.random() < 0.25:  # videos: captions, or their questions
        clips = [random_clip(rng) for _ in range(rng.randint(2, 6))]
        if rng.random() < 0.5:
            return " ".join(f"Output: {clip.caption} ." for clip in clips)
        return " ".join(f"Question: {VIDEO_QUESTIONS[c.task]} Answer: {c.answer(c.task)} ." for c in clips)
    items = [random_item(rng) for _ in range(rng.randint(2, 6))]
    kind = rng.random()
    if kind < 0.4:
        task = rng.choice(["caption", "colour", "shape"])
        return " ".join(f"Output: {it.answer(task)} ." for it in items)
    if kind < 0.8:
        parts = []
        for it in items:
            task = rng.choice(["colour", "shape"])
            parts.append(f"Question: {QUESTIONS[task]} Answer: {it.answer(task)} .")
        return " ".join(parts)
    return "A page of pictures . " + " ".join(f"This picture shows {it.caption} ." for it in items)


def lm_sample(rng: random.Random, vocabulary: list[str]) -> str:
    """One LM training text: a third each of repeated spans, episodes and world text."""
    r = rng.random()
    if r < 0.3:
        return repeated_span(rng, vocabulary)
    if r < 0.75:
        prompt, answer, _ = text_episode(rng, labels=TEXT_LABELS)
        return f"{prompt} {answer} ."
    return world_text(rng)


# -- documents for Flamingo -----------------------------------------------------------------

def document(rng: random.Random, max_images: int = 5) -> tuple[list[Item], list]:
    """An interleaved training document: (items, segments), segments being text and image
    indices as `flamingo encode --wds` expects. Each text follows its image."""
    n = rng.randint(2, max_images)
    kind = rng.random()
    segments: list = []
    if kind < 0.45:  # few-shot episode with label words bound for this document only
        ways = rng.choice([2, 2, 3, 4])
        classes = rng.sample(TRAIN_COMBOS, ways)
        words = rng.sample(TRAIN_LABELS, ways)
        order = [rng.randrange(ways) for _ in range(n)]
        items = [Item(*classes[i], rng.getrandbits(32)) for i in order]
        for j, i in enumerate(order):
            segments += [j, f"Output: {words[i]}"]
        return items, segments
    items = [random_item(rng) for _ in range(n)]
    if kind < 0.75:  # one task for the whole document: the shots say which
        task = rng.choice(["caption", "colour", "shape"])
        for j, it in enumerate(items):
            segments += [j, f"Output: {it.answer(task)}"]
    else:
        for j, it in enumerate(items):
            task = rng.choice(["colour", "shape"])
            segments += [j, f"Question: {QUESTIONS[task]} Answer: {it.answer(task)}"]
    return items, segments
