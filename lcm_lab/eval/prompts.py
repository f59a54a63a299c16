"""Prompt sets for evaluation: each is a list of ``(prompt, metadata)`` pairs.

* ``toy``: held-out captions of the toy world (metadata: ``attributes`` for prompt accuracy);
* a text file: one prompt per line (blank lines skipped and counted, over-long lines reported);
* ``hps:DIR``: the HPSv2 benchmark (Wu et al. 2023): ``anime.json``, ``concept-art.json``,
  ``paintings.json``, ``photo.json``, each a JSON list of prompts (metadata: ``style``), as in
  the ``hpsv2`` package's ``benchmark/`` folder;
* ``coco:FILE``: a COCO captions annotation file (``captions_val2014.json`` /
  ``captions_val2017.json``), one caption per image (metadata: ``image_id``, ``file_name``).

Nothing is downloaded: the benchmark files are user-supplied. :func:`load_prompt_set` parses
the ``--prompts`` spec of ``lcm-lab eval``.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
CLIP_CONTEXT = 77  # tokens, start and end markers included (SD 1.x/2.x text encoders)


class PromptSet(list):
    """A list of ``(prompt, metadata)`` pairs plus where it came from.

    Attributes:
        name: short description (``"toy"``, ``"hps:<dir>"``, ``"coco:<file>"``, the file path).
        skipped_blank: blank lines skipped (text files).
        too_long: ``(line_or_index, n_tokens)`` of prompts longer than ``max_tokens``.
        max_tokens: the token limit ``too_long`` was checked against.
        notes: human-readable remarks (skips, over-long prompts, subsampling).
    """

    def __init__(self, items=(), name: str = "", skipped_blank: int = 0, too_long=None,
                 max_tokens: int | None = None, notes=None):
        super().__init__(items)
        self.name = name
        self.skipped_blank = skipped_blank
        self.too_long = list(too_long or [])
        self.max_tokens = max_tokens
        self.notes = list(notes or [])

    @property
    def prompts(self) -> list[str]:
        return [p for p, _ in self]

    @property
    def metadata(self) -> list[dict]:
        return [m for _, m in self]


def count_tokens(prompts: list[str], tokenizer=None) -> list[int]:
    """CLIP tokens per prompt, start and end markers included (what ``encode_prompts`` checks).

    ``tokenizer``: a transformers tokenizer (e.g. the model's); default open_clip's CLIP BPE
    tokenizer, bundled with open_clip (the same ids as SD's CLIPTokenizer), so no model is needed.
    """
    if tokenizer is not None:
        return [len(tokenizer(p).input_ids) for p in prompts]
    tok = _clip_bpe()
    return [len(tok.encode(p)) + 2 for p in prompts]


@functools.lru_cache(maxsize=1)
def _clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _check_lengths(prompts: list[str], keys: list, tokenizer, max_tokens: int | None) -> list[tuple]:
    if max_tokens is None:
        return []
    counts = count_tokens(prompts, tokenizer)
    return [(k, n) for k, n in zip(keys, counts) if n > max_tokens]


def _too_long_note(too_long: list[tuple], max_tokens: int | None, what: str) -> list[str]:
    if not too_long:
        return []
    shown = ", ".join(f"{k} ({n} tokens)" for k, n in too_long[:10])
    more = f" and {len(too_long) - 10} more" if len(too_long) > 10 else ""
    return [f"{len(too_long)} prompt(s) longer than {max_tokens} tokens: {what} {shown}{more}"]


def toy_prompts(n: int, start: int | None = None, split: str = "eval") -> PromptSet:
    """``n`` held-out toy-world captions; metadata ``{"attributes": {...}, "index": i}``.

    By default they start at :data:`lcm_lab.eval.toy.PROMPT_START`, disjoint from the
    held-out real images used as FD references."""
    from .toy import PROMPT_START, eval_prompts

    start = PROMPT_START if start is None else start
    if n < 1:
        raise ValueError(f"number of toy prompts must be >= 1, got {n}")
    prompts, attributes = eval_prompts(n, start, split)
    return PromptSet([(p, {"attributes": a, "index": start + i}) for i, (p, a) in enumerate(zip(prompts, attributes))],
                     name="toy")


def read_prompt_file(path: str | os.PathLike, tokenizer=None, max_tokens: int | None = CLIP_CONTEXT) -> PromptSet:
    """One prompt per line (UTF-8); metadata ``{"line": n}`` (1-based).

    Leading/trailing whitespace is stripped; blank lines are skipped and counted
    (``skipped_blank``); prompts longer than ``max_tokens`` CLIP tokens are listed in
    ``too_long`` (by line number) and ``notes``, not dropped (``None`` skips the check).

    Raises:
        FileNotFoundError: no such file. ValueError: not UTF-8 text, or no prompt in it.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} does not exist")
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is not part of prompt 1
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {file} is not UTF-8 text ({exc})") from None
    items, blank = [], 0
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            blank += 1
            continue
        items.append((text, {"line": number}))
    if not items:
        raise ValueError(f"prompt file {file} holds no prompt (one per line expected)")
    too_long = _check_lengths([p for p, _ in items], [m["line"] for _, m in items], tokenizer, max_tokens)
    notes = [f"skipped {blank} blank line(s)"] if blank else []
    notes += _too_long_note(too_long, max_tokens, "lines")
    return PromptSet(items, name=str(file), skipped_blank=blank, too_long=too_long, max_tokens=max_tokens,
                     notes=notes)


def _read_json(file: Path, what: str):
    if not file.is_file():
        raise FileNotFoundError(f"{what} file {file} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} file {file} is not valid JSON ({exc})") from None


def hps_prompts(folder: str | os.PathLike, per_style: int | None = None, styles=HPS_STYLES,
                tokenizer=None, max_tokens: int | None = CLIP_CONTEXT) -> PromptSet:
    """The HPSv2 benchmark prompts (Wu et al. 2023): ``<folder>/<style>.json`` for each style.

    Each file is a JSON list of prompt strings (the ``hpsv2`` package's ``benchmark/`` layout,
    800 prompts per style). Metadata ``{"style": name, "index": i}``; ``per_style`` keeps the
    first ``per_style`` prompts of each style. The styles are interleaved round-robin (prompt 0 of
    each style, then prompt 1, ...), so the first ``n`` prompts of the set cover every style (evenly
    when ``n`` is a multiple of the style count): an evaluation cut to fewer samples than the set
    still averages all styles. HPSv2 is reported as the mean score x 100 per style (see
    :mod:`lcm_lab.eval.clip_metrics`).

    Raises:
        FileNotFoundError: the folder or a style file is missing. ValueError: a file is not a
        JSON list of non-empty strings.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"HPSv2 benchmark folder {root} does not exist (expected "
                                f"{', '.join(s + '.json' for s in HPS_STYLES)} in it)")
    if per_style is not None and per_style < 1:
        raise ValueError(f"per_style must be >= 1, got {per_style}")
    by_style = []
    for style in styles:
        file = root / f"{style}.json"
        data = _read_json(file, "HPSv2 benchmark")
        if not isinstance(data, list) or not data or not all(isinstance(p, str) and p.strip() for p in data):
            raise ValueError(f"HPSv2 benchmark file {file} must be a non-empty JSON list of non-empty prompt strings")
        chosen = data[:per_style] if per_style else data
        by_style.append([(p.strip(), {"style": style, "index": i}) for i, p in enumerate(chosen)])
    items = [group[i] for i in range(max(map(len, by_style), default=0)) for group in by_style if i < len(group)]
    too_long = _check_lengths([p for p, _ in items], [f"{m['style']}[{m['index']}]" for _, m in items],
                              tokenizer, max_tokens)
    return PromptSet(items, name=f"hps:{root}", too_long=too_long, max_tokens=max_tokens,
                     notes=_too_long_note(too_long, max_tokens, "prompts"))


def coco_captions(path: str | os.PathLike, limit: int | None = None, seed: int = 0, tokenizer=None,
                  max_tokens: int | None = CLIP_CONTEXT) -> PromptSet:
    """One caption per image from a COCO captions annotation file (``captions_*.json``).

    The caption of an image is the one with the smallest annotation id (independent of file
    order). Images are listed by increasing ``image_id``; with ``limit``, a subset of ``limit``
    images is drawn with ``random.Random(seed)`` (the usual "COCO-30k" protocol) and kept in
    ``image_id`` order. Metadata ``{"image_id", "caption_id", "file_name"}`` (``file_name``
    from the ``images`` list when present, for FID against those images).

    Raises:
        FileNotFoundError: no such file. ValueError: not a COCO captions file.
    """
    file = Path(path)
    data = _read_json(file, "COCO captions")
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not annotations:
        raise ValueError(f"COCO captions file {file} must be a JSON object with a non-empty 'annotations' list "
                         "(like captions_val2014.json)")
    best: dict[int, tuple] = {}
    for k, ann in enumerate(annotations):
        if not (isinstance(ann, dict) and isinstance(ann.get("image_id"), int)
                and isinstance(ann.get("caption"), str) and ann["caption"].strip()):
            raise ValueError(f"COCO captions file {file}: annotation #{k} lacks an integer 'image_id' and a "
                             f"non-empty 'caption': {str(ann)[:120]}")
        ann_id = ann.get("id", k)
        if not isinstance(ann_id, int):
            raise ValueError(f"COCO captions file {file}: annotation #{k} has a non-integer 'id' {ann_id!r}")
        if ann["image_id"] not in best or ann_id < best[ann["image_id"]][0]:
            best[ann["image_id"]] = (ann_id, " ".join(ann["caption"].split()))
    names = {}
    for img in data.get("images") or []:
        if isinstance(img, dict) and "id" in img and "file_name" in img:
            names[img["id"]] = img["file_name"]
    ids = sorted(best)
    notes = []
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if limit < len(ids):
            ids = sorted(random.Random(seed).sample(ids, limit))
            notes.append(f"{limit} of {len(best)} images drawn with seed {seed}")
    items = [(best[i][1], {"image_id": i, "caption_id": best[i][0], "file_name": names.get(i)}) for i in ids]
    too_long = _check_lengths([p for p, _ in items], [f"image {m['image_id']}" for _, m in items],
                              tokenizer, max_tokens)
    return PromptSet(items, name=f"coco:{file}", too_long=too_long, max_tokens=max_tokens,
                     notes=notes + _too_long_note(too_long, max_tokens, "captions of"))


def load_prompt_set(spec: str, num: int | None = None, tokenizer=None, max_tokens: int | None = CLIP_CONTEXT,
                    per_style: int | None = None, seed: int = 0) -> PromptSet:
    """Parse a ``--prompts`` spec: ``toy``, ``hps:DIR``, ``coco:FILE`` or a text file path.

    Args:
        num: how many prompts are wanted. For ``toy`` exactly ``num`` held-out captions
            (default 1000); for ``coco`` the caption subset size; other sets are returned whole
            (:func:`~lcm_lab.eval.evaluate.evaluate` cycles or cuts them to ``num``).
        tokenizer, max_tokens: for the over-long prompt check.
        per_style: HPS prompts per style.
        seed: COCO subset seed.
    """
    spec = str(spec)
    if spec == "toy":
        return toy_prompts(num or 1000)
    if spec.startswith("hps:"):
        return hps_prompts(spec[4:], per_style=per_style, tokenizer=tokenizer, max_tokens=max_tokens)
    if spec.startswith("coco:"):
        return coco_captions(spec[5:], limit=num, seed=seed, tokenizer=tokenizer, max_tokens=max_tokens)
    if not spec:
        raise ValueError("empty prompt-set spec; use toy, a text file, hps:DIR or coco:FILE")
    return read_prompt_file(spec, tokenizer=tokenizer, max_tokens=max_tokens)
