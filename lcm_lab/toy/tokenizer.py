"""A transformers CLIPTokenizer rebuilt offline from open_clip's bundled BPE merges.

open_clip ships the CLIP byte-level BPE file (``bpe_simple_vocab_16e6.txt.gz``); the
vocabulary is the 256 byte symbols, the same with an end-of-word marker, one entry per
merge, then the two special tokens (Radford et al. 2021; open_clip ``SimpleTokenizer``).
Writing that vocabulary as ``vocab.json`` + ``merges.txt`` gives a stock
``CLIPTokenizer`` whose ids equal open_clip's, with no hub download.

Padding uses ``<|endoftext|>`` as Stable Diffusion 1.x does; open_clip pads with 0. Up to
and including the first end-of-text token the ids are identical. (SD 2.x's pad token
``"!"`` would make the padding equal too, but then a literal "!" in a prompt is read as
padding.)
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP's 49408-token vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP reversible byte -> printable unicode map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id) and merge list from open_clip's BPE file."""
    if bpe_path is None:
        from open_clip.tokenizer import default_bpe

        bpe_path = default_bpe()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out


def load_clip_tokenizer(path: str | os.PathLike):
    """Load the tokenizer folder written by :func:`write_clip_tokenizer`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))
