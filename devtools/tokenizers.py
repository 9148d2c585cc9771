"""Tokenizers built offline: CLIP's BPE (whole or cut to given words) and a small T5 unigram model.

Used by the tiny test models and the trained shapes model; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
from pathlib import Path

import sentencepiece as spm
from transformers import CLIPTokenizer, T5Tokenizer

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGE_COUNT = 49152 - 256 - 2
T5_SPM_VOCAB_SIZE = 1000

COLOURS = "red blue green yellow orange purple pink black white grey brown golden silver".split()
SHAPES = "circle square triangle star hexagon rectangle heart diamond sphere cube spiral".split()
SUBJECTS = (
    "cat dog horse astronaut robot bird fox owl dragon child woman man car bicycle boat tree house "
    "castle lighthouse elephant tiger lion rabbit turtle whale dolphin penguin butterfly knight "
    "wizard princess pirate samurai chef teapot guitar violin clock umbrella lantern balloon "
    "train airplane rocket submarine mushroom cactus sunflower apple banana strawberry cupcake"
).split()
ADJECTIVES = (
    "tiny huge fluffy ancient futuristic shiny rusty wooden glass metallic glowing friendly "
    "mysterious happy sleepy majestic colorful elegant giant little old young cute beautiful "
    "strange broken floating"
).split()
ACTIONS = (
    "sitting|running|standing|sleeping|flying|jumping|riding a horse|reading a book|playing guitar|"
    "eating an apple|looking at the stars|swimming|dancing|painting a picture|drinking coffee|"
    "climbing a tree|holding an umbrella|wearing a hat|walking slowly|smiling"
).split("|")
SCENES = (
    "on the moon|in a forest|on a beach at sunset|in a city street at night|in a snowy field|"
    "under the sea|in a kitchen|on a mountain top|in the desert|in a garden full of flowers|"
    "inside a spaceship|near a lake|in a library|on a wooden table|in the rain|above the clouds|"
    "in a cozy living room|on a busy market square|in a neon cyberpunk alley|by the river"
).split("|")
STYLES = (
    "a photo of|a painting of|a watercolor of|a sketch of|a 3d render of|a close-up photo of|"
    "an illustration of|pixel art of|a cinematic shot of|an oil painting of|a studio portrait of|"
    "a cartoon drawing of|a macro photograph of"
).split("|")
DETAILS = (
    "high quality|4k|8k resolution|highly detailed|soft lighting|dramatic lighting|golden hour|"
    "trending on artstation|sharp focus|wide angle|bokeh|vibrant colors|minimalist|"
    "photorealistic|35mm film"
).split("|")
EXTRA_WORDS = (
    "the of and in on with under over near behind beside between through across into from "
    "morning evening night sunrise sunset winter summer autumn spring storm fog snow rain "
    "mountain river ocean island valley village city bridge tower street road field meadow "
    "window door roof wall floor ceiling chair table lamp book cup bottle plate flower leaf "
    "cloud moon sun planet galaxy nebula comet volcano waterfall canyon glacier jungle swamp "
    "portrait landscape poster logo icon sticker sculpture statue mosaic tapestry origami "
    "vintage modern retro baroque gothic surreal abstract impressionist cubist anime comic "
    "camera lens shadow reflection silhouette texture pattern gradient outline background "
    "smooth rough soft hard bright dark warm cold quiet loud fast slow heavy light empty full"
).split()
CHARACTER_LINES = [
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 - + = ( ) [ ] { } : ; ' \" ? ! @ # $ % & * / \\ _ ~ < >",
]


def clip_bpe_path() -> Path:
    """Locate open_clip's BPE merges file without importing open_clip (and its heavy deps)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"open_clip is not installed; it ships {CLIP_BPE_FILE}")
    return Path(next(iter(spec.submodule_search_locations))) / CLIP_BPE_FILE


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible table mapping each byte to a printable unicode character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    unprintable = [byte for byte in range(256) if byte not in printable]
    code_points = printable + [256 + index for index in range(len(unprintable))]
    return dict(zip(printable + unprintable, map(chr, code_points)))


def _merges_applied(merges: list[str], words: set[str]) -> set[int]:
    """Ranks of the BPE merges that CLIP's byte-pair encoding applies to each of `words`."""
    rank = {tuple(merge.split()): index for index, merge in enumerate(merges)}
    to_unicode = bytes_to_unicode()
    applied = set()
    for word in words:
        parts = [to_unicode[byte] for byte in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: rank.get(pair, len(rank)))
            if best not in rank:
                break
            applied.add(rank[best])
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
    return applied


def build_clip_tokenizer(words: set[str] | None = None) -> CLIPTokenizer:
    """CLIP's BPE tokenizer, with vocab and merges as CLIP's SimpleTokenizer (49408 tokens).

    With `words`, only the merges those words need are kept: they tokenize exactly as with the
    full table (one token each for common words), and the vocabulary stays small.
    """
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as bpe_file:
        merges = bpe_file.read().split("\n")[1 : CLIP_MERGE_COUNT + 1]
    if words is not None:
        keep = _merges_applied(merges, {word.lower() for word in words})
        merges = [merge for index, merge in enumerate(merges) if index in keep]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: token_id for token_id, token in enumerate(tokens)},
        merges=[tuple(merge.split()) for merge in merges],
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


def t5_training_corpus() -> list[str]:
    """About 2700 deterministic English prompts about objects, colours, shapes and scenes."""
    sentences = list(CHARACTER_LINES)
    for index in range(len(COLOURS) * len(SHAPES)):
        colour, background = COLOURS[index % len(COLOURS)], COLOURS[(index * 5 + 3) % len(COLOURS)]
        shape = SHAPES[(index // len(COLOURS) + index) % len(SHAPES)]
        sentences.append(f"a {colour} {shape} on a {background} background")
        sentences.append(
            f"{index + 2} {colour} {shape}s next to a {background} "
            f"{EXTRA_WORDS[index % len(EXTRA_WORDS)]}"
        )
    for index in range(600):
        prompt = (
            f"{STYLES[index % len(STYLES)]} a {ADJECTIVES[index * 3 % len(ADJECTIVES)]} "
            f"{COLOURS[index * 11 % len(COLOURS)]} {SUBJECTS[index * 7 % len(SUBJECTS)]} "
            f"{ACTIONS[index * 13 % len(ACTIONS)]} {SCENES[index * 17 % len(SCENES)]} "
            f"with a {EXTRA_WORDS[index * 23 % len(EXTRA_WORDS)]}, "
            f"{DETAILS[index * 19 % len(DETAILS)]}"
        )
        sentences += [prompt, prompt.capitalize() + ".", prompt.title(), prompt.upper()]
    return sentences


def train_t5_spm(corpus: list[str] | None = None, vocab_size: int = T5_SPM_VOCAB_SIZE) -> bytes:
    """Train a small sentencepiece unigram model with T5's special ids; same bytes every run."""
    spm.SetRandomGeneratorSeed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus or t5_training_corpus()), model_writer=model,
        model_type="unigram", vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return model.getvalue()


def spm_model_pb2():
    """sentencepiece's protobuf module for model files."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except Exception:  # its generated code may demand a newer protobuf runtime than installed
        from transformers.utils import sentencepiece_model_pb2_new as sentencepiece_model_pb2
    return sentencepiece_model_pb2


def spm_precompiled_charsmap(spm_model: bytes) -> bytes:
    """The normalizer table of a serialized sentencepiece model."""
    model_proto = spm_model_pb2().ModelProto.FromString(spm_model)
    return model_proto.normalizer_spec.precompiled_charsmap


def build_t5_tokenizer(spm_model: bytes) -> T5Tokenizer:
    """T5 unigram tokenizer (plus T5's 100 sentinel tokens) from serialized sentencepiece bytes."""
    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(len(processor))]
    return T5Tokenizer(
        vocab=vocab,
        _spm_precompiled_charsmap=spm_precompiled_charsmap(spm_model),
        model_max_length=512,
    )


# Chat templates of the FLUX.2 text encoders' tokenizers, cut to what the pipelines send: Qwen3's
# (klein: one user turn, a generation prompt, thinking switched off) and Mistral's (dev: a system
# turn and a user turn whose content is a list of text parts).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}{%- endfor %}"
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                          "[/SYSTEM_PROMPT]")
BYTE_BPE_VOCAB_SIZE = 1000


def train_byte_bpe(special_tokens: tuple[str, ...], extra_text: tuple[str, ...] = (),
                   vocab_size: int = BYTE_BPE_VOCAB_SIZE):
    """A byte-level BPE (as Qwen's and Mistral's tokenizers are) trained on the T5 corpus and
    `extra_text`; the same merges every run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([*t5_training_corpus(), *extra_text], trainer)
    return tokenizer


def build_qwen_tokenizer():
    """A small Qwen2 tokenizer with Qwen3's chat markers (FLUX.2 klein's text encoder)."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=train_byte_bpe(QWEN_SPECIAL_TOKENS), unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=512)


def build_mistral_tokenizer(system_message: str):
    """A small byte-level BPE tokenizer with Mistral's chat markers (FLUX.2 dev's text encoder),
    trained with the pipeline's system message so that it takes few tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_byte_bpe(MISTRAL_SPECIAL_TOKENS, (system_message,) * 20),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=MISTRAL_CHAT_TEMPLATE, model_max_length=512)
