"""An independent perplexity of a registered GGUF variant: transformers' GGUF loader (it dequantizes
the file to torch) on the very token windows the engine scored, beside the engine's own number.

    python benchmarks/gguf_perplexity_check.py NAME [--registry registry.db]

The windows come from the variant's reference pass (so the variant needs `eval.perplexity` and a
reference); the model file is the variant's own model.gguf in the store.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--registry", default="registry.db")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import engine
    from engine.catalog import show
    from engine.metrics import recorded_windows_perplexity
    from engine.paths import resolve

    locations = resolve(args.registry, None)
    doc = show(args.name, locations)
    ref_step = next((s for s in doc["steps"] if s["kind"] == "reference"), None)
    if ref_step is None:
        print(f"{args.name} has no reference pass (eval.perplexity with a reference)", file=sys.stderr)
        return 1
    reference = json.loads(next(Path(locations.store).glob(f"*/{ref_step['key']}/files/reference.json")).read_text())
    folder = Path(engine.load(args.name, registry=args.registry).info.artifact_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        theirs = recorded_windows_perplexity(
            reference["windows"], lambda ids: model(torch.tensor([ids])).logits[0].float().numpy())
    ours = doc["scores"]["perplexity"]["value"]
    print(json.dumps({"variant": args.name, "engine_llama_cpp": round(ours, 3),
                      "transformers_gguf_loader": round(theirs, 3),
                      "relative_difference": round(abs(ours - theirs) / theirs, 5), "scored_tokens": reference["scored_tokens"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
