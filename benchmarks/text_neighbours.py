"""Why an erasure by keys and values takes a concept's neighbours: the text encoder's token states.

    python benchmarks/text_neighbours.py [--kind colour] [--contexts "a {} star" ...]

The `esd-x-strict` adapter is a linear map on the text encoder's output states (every token position:
the causal encoder carries the concept into every token after it). For each context, this prints the rank
of the other concepts' states, how much of each concept's states lies outside their span (0 means a map
that leaves every other concept of the kind unchanged leaves this one unchanged too), and each concept's
two nearest concepts (relative distance of the whole state sequence), the ones its erasure takes first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esd_lora.models import load_pipeline  # noqa: E402
from esd_lora.toy.vocab import KINDS  # noqa: E402


def token_states(pipe, prompt: str) -> torch.Tensor:
    """The text encoder's output states of a prompt, one row per token position (padding included)."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0][0].float()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="colour", choices=list(KINDS))
    parser.add_argument("--contexts", nargs="+", default=None, help="templates with {} for the concept")
    args = parser.parse_args(argv)
    contexts = args.contexts or (["a {} star", "a photo of a {} circle"] if args.kind == "colour"
                                 else ["a red {}", "a photo of a blue {}"])
    pipe, concepts = load_pipeline("toy"), list(KINDS[args.kind])
    for context in contexts:
        states = {c: token_states(pipe, context.format(c)) for c in concepts}
        print(f"{context}:")
        for concept in concepts:
            others = torch.cat([states[c] for c in concepts if c != concept])
            basis = torch.linalg.svd(others.T, full_matrices=False).U[:, :torch.linalg.matrix_rank(others)]
            h = states[concept]
            outside = (h - h @ basis @ basis.T).norm() / h.norm()
            near = sorted((float((h - states[c]).norm() / h.norm()), c) for c in concepts if c != concept)[:2]
            print(f"  {concept:10s} others' rank {basis.shape[1]} of {others.shape[1]}, outside their span "
                  f"{outside:.1%}, nearest {near[0][1]} ({near[0][0]:.2f}), {near[1][1]} ({near[1][0]:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
