"""A tiny sentencepiece tokenizer for the tiny presets, trained on the fly from an embedded corpus.

It has the layout of google/umt5-xxl's tokenizer (unigram model, <pad>=0, </s>=1, <unk>=2, EOS
appended) so the same loading code (`umt5.load_umt5_tokenizer`) reads both; only the vocabulary is
small (512 = the tiny UMT5Config.vocab_size) and there are no <extra_id_*> sentinels. Training is
single-threaded and seedless, so the model file is byte-identical on every machine.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

TOKENIZER_DIRNAME = "tiny-umt5-tokenizer-v1"
"""Cache folder name; bump the suffix whenever the corpus or the trainer options change."""

_SUBJECTS = (
    "a red fox|an old fisherman|two laughing children|a golden retriever puppy|a woman in a flowing blue dress|"
    "a small silver robot|a herd of wild horses|a sleepy orange cat|an astronaut in a white suit|"
    "a chef with a tall hat|"
    "a ballet dancer|a surfer on a longboard|a knight in shining armor|a young girl with freckles|"
    "a flock of migrating geese|a wooden sailboat|a vintage steam train|a glowing jellyfish|a giant panda|"
    "a teenage skateboarder|an elderly couple|a hummingbird|a majestic eagle|a playful dolphin|a street musician|"
    "a grumpy owl|a curious squirrel|a bearded wizard|a racing car|a hot air balloon|a sea turtle|"
    "a polar bear family|a mountain goat|a busy bee|a tiny mouse|a samurai warrior|a jazz pianist|"
    "a farmer driving a tractor|a firefighter|a monarch butterfly"
).split("|")
_ACTIONS = (
    "runs across|walks slowly through|jumps over a puddle in|dances gracefully in|flies high above|"
    "rests quietly beside|carefully explores|paints a colorful picture of|rides a bicycle through|swims gently under|"
    "bravely climbs|sings a cheerful song near|silently watches|plays with a bouncing ball in|"
    "cooks a delicious dinner in|reads an ancient book in|glides smoothly over|sleeps peacefully under|"
    "chases fireflies around|builds a sandcastle on|juggles oranges in front of|waves hello from|"
    "searches for treasure in|spins around joyfully in|stares thoughtfully at|drifts lazily along|sprints toward|"
    "tiptoes past|leaps between rooftops of|photographs"
).split("|")
_PLACES = (
    "a snowy pine forest|the wet city street at night|a sunny tropical beach|a misty mountain valley|"
    "an ancient stone temple|a crowded outdoor market|a quiet university library|the dusty surface of the moon|"
    "a vast field of sunflowers|a neon lit alley in Tokyo|a vibrant coral reef|a red desert canyon|"
    "a cozy farmhouse kitchen|a rainy fishing harbor|a crumbling medieval castle|a swaying bamboo grove|"
    "a frozen arctic lake|a busy train station|an abandoned amusement park|a lavender meadow in summer|"
    "a volcano erupting at dusk|a glass skyscraper rooftop|a foggy Victorian bridge|an underwater shipwreck|"
    "a colorful autumn orchard|a roaring waterfall|a spaceship control room|a candle lit cathedral|"
    "a jungle river at dawn|a windy lighthouse cliff"
).split("|")
_STYLES = (
    "cinematic lighting|slow motion|aerial drone shot|extreme close up|wide angle lens|golden hour sunlight|"
    "shallow depth of field|highly detailed|handheld camera|time lapse|soft studio lighting|dramatic shadows|"
    "vivid saturated colors|vintage film grain|smooth tracking shot|dreamy pastel palette|photorealistic|"
    "anime style|watercolor painting|black and white documentary|four k resolution|moody blue tones|"
    "warm cozy atmosphere|epic orchestral mood|playful cartoon look"
).split("|")
_PROSE = """\
The morning fog lifts over quiet rooftops while merchants open their wooden shutters and sweep the cobblestones.
Heavy raindrops splash against the window as a lonely traveler checks an old brass compass and studies a torn map.
Children chase kites across the green hill, their laughter echoing toward the distant village church bell.
Thunder rumbles beyond the horizon; lightning briefly reveals jagged cliffs, twisted trees, and a narrow winding path.
Inside the workshop, sparks fly from the anvil as the blacksmith hammers glowing iron into a curved blade.
A gentle breeze carries cherry blossom petals across the pond, where koi fish circle beneath floating lily pads.
Snowflakes swirl around the streetlamp, and a couple in thick woolen scarves shares warm chestnuts from a paper bag.
The orchestra tunes its violins, cellos, trumpets and drums before the conductor raises an elegant ivory baton.
Deep in the cave, crystals sparkle with emerald, violet and amber hues, reflecting the beam of a trembling flashlight.
Tall waves crash onto black volcanic sand while seabirds hover, dive, and emerge clutching silver sardines.
An enormous whale breaches the calm ocean surface, then disappears, leaving a spiral of foam and glittering spray.
Racing cyclists lean into the sharp corner, spectators cheer loudly, and colorful flags flutter along the barrier.
Quietly the librarian climbs a rolling ladder, selects a dusty encyclopedia, and blows away decades of forgotten dust.
Fireworks burst above the harbor in crimson, turquoise, and gold, mirrored perfectly by the dark rippling water.
A mechanical clock tower strikes midnight; gears rotate, pendulums swing, and tiny carved figures parade outside.
Farmers harvest ripe pumpkins, stacking them beside baskets of apples, pears, corn, and freshly baked bread.
The submarine descends past curious octopus, drifting plankton, and strange bioluminescent creatures of the abyss.
Under a purple twilight sky, caravans of camels cross enormous dunes toward an oasis shaded by palm trees.
Engineers inspect the rocket engines as vapor vents hiss, countdown lights blink, and the launch tower retracts.
Grandmother kneads dough on a flour covered table while sunlight streams through lace curtains and potted herbs.
""".splitlines()


def tiny_corpus() -> list[str]:
    """Prompt-like sentences (subject, action, place, style, walked with co-prime steps) plus prose."""
    lines = []
    for i in range(1200):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        action = _ACTIONS[(i * 7 + i // 40) % len(_ACTIONS)]
        place = _PLACES[(i * 11 + i // 30) % len(_PLACES)]
        style = _STYLES[(i * 3 + i // 25) % len(_STYLES)]
        lines.append(f"{subject[0].upper()}{subject[1:]} {action} {place}, {style}.")
    return lines + _PROSE * 20


def train_tiny_spiece(vocab_size: int = 512) -> bytes:
    """Serialized sentencepiece unigram model with T5's special-token ids."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer_folder(folder: str | os.PathLike, spiece_model: bytes, max_length: int = 512) -> Path:
    """Write spiece.model and the tokenizer_config.json that makes AutoTokenizer load it as T5."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece_model)
    config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": 0,
        "model_max_length": max_length,
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def ensure_tiny_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Folder of the tiny tokenizer under cache_dir, built on first use.

    Built in a temporary sibling and renamed into place, so concurrent first calls (several workers
    starting at once) never see a half-written folder.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{TOKENIZER_DIRNAME}-{vocab_size}"
    if (target / "tokenizer_config.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=cache_dir))
    write_tokenizer_folder(staging, train_tiny_spiece(vocab_size))
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its folder is identical
        for child in staging.iterdir():
            child.unlink()
        staging.rmdir()
    return target
