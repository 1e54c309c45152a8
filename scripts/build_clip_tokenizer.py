"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) from open_clip's vocabulary.

The vocabulary (MIT licence, OpenAI CLIP) ships inside the open-clip-torch wheel as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. We never install that package on CPU (it needs
torchvision); fetch the wheel and run this script once:

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    python scripts/build_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The result is committed under ``studio/assets/clip_tokenizer`` and is identical to the
tokenizer of Stable Diffusion's text encoder (49,408 tokens, BOS 49406, EOS 49407).
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "studio" / "assets" / "clip_tokenizer"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode map (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build(merges_text: str) -> tuple[dict[str, int], list[str]]:
    """CLIP's construction: bytes, bytes+'</w>', the first 48,894 merges, then BOS/EOS."""
    lines = merges_text.split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="open-clip-torch wheel or the bpe_simple_vocab_16e6.txt.gz file")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    src = Path(args.source)
    if src.suffix == ".whl":
        with zipfile.ZipFile(src) as zf:
            raw = zf.read(MEMBER)
    else:
        raw = src.read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    vocab, merges = build(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merges) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main()
