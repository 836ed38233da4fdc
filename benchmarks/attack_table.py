"""The attack table: plain esd-lora, robust esd-lora and classic ESD under the same attacks, in one run.

    python benchmarks/attack_table.py [--concepts red star] [--n 32]

For each concept, three erasures of the shipped toy model, all from the concept's robust recipe
(recipes/toy/<concept>_robust.yaml: every prompt in 16 contexts, the rest of the kind preserved), so that they
differ only in what is compared:
- `robust`: the shipped adapter adapters/<concept>_robust (that recipe as it is, with its `attack:` section);
- `plain`: that recipe without its attackers, with ESD's neutral prompt each context without the concept and
  the concept's rows retrained beside its K/V LoRA (BASELINE and PLAIN: the kind recipes colour.yaml and
  shape.yaml as they were when the table was measured), trained here;
- `classic`: classic ESD (`adapter: none`: the esd-x cross-attention weights themselves, Adam) from the
  same baseline (for red with AS_MEASURED, as the module variants; the published column was trained when
  red_robust.yaml still preserved the other colours at weight 1), trained here at its best lr: for the first
  concept, each of CLASSIC_LRS is trained and measured by `esd-lora eval` (default prompts, 16 images each),
  and the lr with the lowest worst-case detection of the concept among those keeping the other concepts at
  >= 90 % of base wins (the lowest detection if none does); the other concepts use that lr. The chosen run is
  merged.
Each is attacked by `esd-lora attack` with the same seeds, images and budgets (400 steps): textual inversion
at lr 5e-3 and 5e-2 from the concept's own word, a 4-token soft prompt, and the prompt search; each robust
erasure (`robust` and the module variants below) also with settings its training never used (another initial
word; two tokens at another lr; two other seeds) and, for the --merged-on concepts, on its merged model, and measured by
`esd-lora eval` on held-out prompts (8 per concept, 32 images each).
`--variants "robust, esd-u" "robust, text encoder" "robust, concept tokens"` compares the modules the robust
recipe trains: the same recipe with LoRA on everything but cross-attention (esd-u) instead of its K/V, on its
K/V and on every projection of the text encoder, or on its K/V and the embeddings of the concept's own words
(`adapter.concept_tokens`; it also leaves the concept out of each context as neutral prompt, as the baseline
does, so it differs from `robust` in two settings); "robust, concept tokens, ti only" is the last one trained
against its textual-inversion attacker alone (`attack.methods=[ti]`), ", preserve 3" with the preserve prompts
weighted 3, ", own context" with each latent trained under the attackers' prompt in its own context
(`attack.context=own`), and ", own context, preserve 3" with both; later variants add to these names what
they change: ", attack steps 20" (the attackers refitted 20 steps, restarted every 20 refits), ", 2 tokens"
(`attack.tokens=2`), ", synonyms kept" (every word of the kind preserved, synonyms too), ", preserve 10",
", pool" (`attack.pool=4`), ", cosine" (`train.lr_schedule=cosine`), ", seed N" (`train.seed=N`), and the others
of MODULES, each with a comment on what it changes (", esd-x", ", esd-all", ", rank 16", ", 256 images", ...).
The table has one row per erasure and one column per attack, then the held-out eval's three figures.
Runs are cached in build/attack_table/ (a finished run's report is reused; --fresh redoes them); the table goes
to benchmarks/ATTACK_RESULTS.md (or `--out`) after every run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "attack_table"
CLASSIC_LRS = ("1e-4", "3e-4", "1e-3")
OTHER_WORD = {"red": "blue", "star": "circle"}
# plain and classic ESD: the robust recipe without its attackers, ESD's neutral prompt each context without the
# concept (shapes at eta 2), as recipes/toy/colour.yaml and shape.yaml were when this table was measured;
# plain also retrains the concept's rows beside its K/V LoRA (the kind recipes have since kept the rows alone)
BASELINE = {"red": ["attack.methods=[]", "attack.new_words=false", "concept.erase_from=['']"],
            "star": ["attack.methods=[]", "concept.erase_from=['']", "concept.eta=2"]}
PLAIN = ["adapter.concept_tokens=true"]
# the settings red_robust.yaml changed when it took the variants "<FROZEN_OWN>, eta 0.75" and then "…, new words",
# set back for classic ESD and MODULES' variants so that they train as before those changes (eta 1, the adapter's
# own samples, the colours' names alone preserved on the concept's samples, the soft prompt restarted from the same
# words); variants that set them still train as they were measured
AS_MEASURED = {"red": ["concept.eta=1.0", "train.sampler=trained", "concept.preserve_on=erased",
                       "concept.preserve=[red, orange, yellow, green, cyan, blue, purple, white]",
                       "attack.new_words=false"], "star": []}
ATTACKS = {
    "ti, lr 5e-3": ["--method", "ti", "--lr", "5e-3"],
    "ti, lr 5e-2": ["--method", "ti", "--lr", "5e-2"],
    "soft prompt, 4 tokens, lr 1e-2": ["--method", "soft-prompt", "--tokens", "4", "--lr", "1e-2"],
    "prompt search, 128 prompts": ["--method", "prompts"],
}
UNSEEN = {  # attack settings no robust training used
    "ti from another word": ["--method", "ti", "--lr", "5e-3", "--init", "{other}"],
    "ti, 2 tokens, lr 1e-2": ["--method", "ti", "--tokens", "2", "--lr", "1e-2"],
    "ti, seed 1": ["--method", "ti", "--lr", "5e-3", "--seed", "1"],
    "ti, seed 2": ["--method", "ti", "--lr", "5e-3", "--seed", "2"],
}


# own context and preserve weight 3, with the concept's rows: the base of the later variants
OWN_PRESERVE_3 = ["adapter.concept_tokens=true", "concept.erase_from=['']", "attack.context=own",
                  "concept.preserve_weight=3"]
STEPS_20 = ["attack.steps=20", "attack.restart_every=20"]
# the attack-steps-20 recipe with every latent sampled by the base and every colour's words preserved on their own
# samples, which the later variants change one setting of
FROZEN_OWN = "robust, concept tokens, own context, preserve 3 own, attack steps 20, synonyms kept, frozen sampler"
FROZEN_OWN_OVERRIDES = [*OWN_PRESERVE_3, *STEPS_20, "concept.preserve_on=own", "{synonyms}", "train.sampler=frozen"]


def at_seeds(name: str, overrides: list[str], seeds: tuple[int, ...] = (0, 1)) -> dict[str, list[str]]:
    """One variant trained at several seeds: `name` at seed 0, "`name`, seed N" at the others."""
    return {name + (f", seed {i}" if i else ""): [*overrides, f"train.seed={i}"] for i in seeds}


MODULES = {  # the robust recipe with other trained modules than cross-attention K/V (esd-x-strict)
    "robust, esd-u": ["adapter.targets=esd-u"],
    "robust, text encoder": ["adapter.text_encoder=all"],  # on K/V as well
    # on K/V as well; the concept left out of each context as ESD's neutral prompt, as the baseline does
    "robust, concept tokens": ["adapter.concept_tokens=true", "concept.erase_from=['']"],
    # the same against the textual-inversion attacker alone: the soft prompt starts from random words, on the
    # toy mostly other concepts, and training under them pulled those concepts out too
    "robust, concept tokens, ti only": ["adapter.concept_tokens=true", "concept.erase_from=['']",
                                        "attack.methods=[ti]"],
    # the kind's other concepts held three times as hard
    "robust, concept tokens, preserve 3": ["adapter.concept_tokens=true", "concept.erase_from=['']",
                                           "concept.preserve_weight=3"],
    # each latent trained under the attackers' prompt in its own context, so that prompt and target agree
    "robust, concept tokens, own context": ["adapter.concept_tokens=true", "concept.erase_from=['']",
                                            "attack.context=own"],
    "robust, concept tokens, own context, preserve 3": OWN_PRESERVE_3,
    # each attacker's prompt pulled to what the base draws under it less the concept, so that what its tokens
    # say besides the concept (the neighbours they drifted to) is kept
    "robust, concept tokens, attacker target": ["adapter.concept_tokens=true", "concept.erase_from=['']",
                                                "attack.target=attacker"],
    "robust, concept tokens, own context, preserve 3, attacker target": [*OWN_PRESERVE_3, "attack.target=attacker"],
    "robust, concept tokens, own context, preserve 3, ti only": [*OWN_PRESERVE_3, "attack.methods=[ti]"],
    "robust, concept tokens, own context, preserve 3, ti only, attack steps 20": [
        *OWN_PRESERVE_3, "attack.methods=[ti]", *STEPS_20],
    # the attackers' prompts weighted twice, against the preserve weight's pull the other way
    "robust, concept tokens, own context, preserve 3, attack weight 2": [*OWN_PRESERVE_3, "attack.weight=2"],
    # the attackers refitted twice as long, and over as many steps as the audit's attacks before they restart
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20", [*OWN_PRESERVE_3, *STEPS_20],
               (0, 1, 2)),
    # and the attackers' targets at eta 0: their prompts pulled to the neutral prediction, not past it towards
    # the concept's opposite (for red, cyan)
    "robust, concept tokens, own context, preserve 3, attack steps 20, attack eta 0": [
        *OWN_PRESERVE_3, *STEPS_20, "attack.eta=0"],
    # ... and at eta 2: the attackers' prompts pulled twice as far past the neutral prediction
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, attack eta 2",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.eta=2"]),
    # ... and the attackers at lr 2e-2 instead of 5e-2: nearer red, less far into its neighbours
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, attack lr 2e-2",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.lr=2e-2"]),
    "robust, concept tokens, own context, preserve 3, seed 1": [*OWN_PRESERVE_3, "train.seed=1"],
    # the attack-steps-20 recipe on a cosine lr: the adapter settles at the end instead of following the last
    # attacker, as weight averaging does in adversarial training
    "robust, concept tokens, own context, preserve 3, attack steps 20, cosine": [
        *OWN_PRESERVE_3, *STEPS_20, "train.lr_schedule=cosine"],
    # and with attackers of two tokens, a superset of the one-token attacks
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, 2 tokens",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.tokens=2"], (0, 1, 2)),
    # ... with every word of the kind preserved, synonyms too ({synonyms}), at weight 3 or 10
    "robust, concept tokens, own context, preserve 3, attack steps 20, 2 tokens, synonyms kept": [
        *OWN_PRESERVE_3, *STEPS_20, "attack.tokens=2", "{synonyms}"],
    "robust, concept tokens, own context, preserve 10, attack steps 20, 2 tokens, synonyms kept": [
        *OWN_PRESERVE_3, "concept.preserve_weight=10", *STEPS_20, "attack.tokens=2", "{synonyms}"],
    # ... with every earlier attacker (as it was before each restart) kept, one of them trained under each step
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, 2 tokens, pool",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.tokens=2", "attack.pool=4"]),
    # the attack-steps-20 recipe (red_robust.yaml since it was measured) with a LoRA of rank 16 instead of 4, room
    # to take the concept's tokens apart from its neighbours'
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, rank 16",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.rank=16", "adapter.alpha=16"]),
    # ... and with every colour's synonyms preserved too, the words the other colours were lost by
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, rank 16, synonyms kept",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.rank=16", "adapter.alpha=16", "{synonyms}"]),
    # the attack-steps-20 recipe trained twice as many steps with its attackers refitted half as often: the same
    # attack compute, more steps for the adapter to settle between refits
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, 640 steps, every 8",
               [*OWN_PRESERVE_3, *STEPS_20, "train.steps=640", "attack.every=8"]),
    # the attack-steps-20 recipe with attackers of four tokens, as many as the audit's soft prompt learns
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, 4 tokens",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.tokens=4"]),
    # the attack-steps-20 recipe with its attackers fitted to 256 of the base's samples instead of 64
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, 256 images",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.images=256"]),
    # the attack-steps-20 recipe with its LoRA on cross-attention's queries and output too (esd-x), where the
    # attention's softmax lies between the text and the change
    **at_seeds("robust, esd-x, concept tokens, own context, preserve 3, attack steps 20",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-x"]),
    # ... and the other colours preserved at weight 10
    **at_seeds("robust, esd-x, concept tokens, own context, preserve 10, attack steps 20",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-x", "concept.preserve_weight=10"]),
    # the attack-steps-20 recipe with a LoRA on the text encoder (every attention and MLP layer) in place of the
    # concept's rows, which cannot go together: the encoder is not linear in the token it reads
    **at_seeds("robust, text encoder, own context, preserve 3, attack steps 20",
               ["concept.erase_from=['']", "attack.context=own", "concept.preserve_weight=3", *STEPS_20,
                "adapter.concept_tokens=false", "adapter.text_encoder=all"]),
    # ... and the other colours preserved at weight 10: the encoder, not linear in what it reads, can in principle
    # keep them and still turn away every token that says red
    **at_seeds("robust, text encoder, own context, preserve 10, attack steps 20",
               ["concept.erase_from=['']", "attack.context=own", "concept.preserve_weight=10", *STEPS_20,
                "adapter.concept_tokens=false", "adapter.text_encoder=all"]),
    # the attack-steps-20 recipe with its LoRA on every layer but cross-attention instead of K/V
    "robust, esd-u, concept tokens, own context, preserve 3, attack steps 20": [
        *OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-u"],
    # ... with the other colours preserved at weight 10 on their own samples, so that what the erasure changes in
    # how the UNet draws (red's pixels are yellow's and purple's too) is held where those colours are drawn
    **at_seeds("robust, esd-u, concept tokens, own context, preserve 10 own, attack steps 20",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-u", "concept.preserve_weight=10",
                "concept.preserve_on=own"]),
    # the attack-steps-20 recipe (K/V) with every colour's words preserved on their own samples, at weight 3 or 10:
    # held where those colours are drawn, not on the concept's latents that the erasure must change
    **at_seeds("robust, concept tokens, own context, preserve 3 own, attack steps 20, synonyms kept",
               [*OWN_PRESERVE_3, *STEPS_20, "concept.preserve_on=own", "{synonyms}"]),
    **at_seeds("robust, concept tokens, own context, preserve 10 own, attack steps 20, synonyms kept",
               [*OWN_PRESERVE_3, *STEPS_20, "concept.preserve_weight=10", "concept.preserve_on=own", "{synonyms}"]),
    # ... with every latent sampled by the base (train.sampler frozen), so that the other colours' own samples
    # still show them when the erasure has begun to move them
    **at_seeds(FROZEN_OWN, FROZEN_OWN_OVERRIDES, (0, 1, 2)),
    **at_seeds("robust, concept tokens, own context, preserve 10 own, attack steps 20, synonyms kept, frozen sampler",
               [*OWN_PRESERVE_3, *STEPS_20, "concept.preserve_weight=10", "concept.preserve_on=own", "{synonyms}",
                "train.sampler=frozen"]),
    # ... with the attackers' prompts weighted 0.5, for the other colours' sake
    **at_seeds(f"{FROZEN_OWN}, attack weight 0.5", [*FROZEN_OWN_OVERRIDES, "attack.weight=0.5"]),
    # ... with the kind's words preserved on the concept's latents as well as on their own (preserve_on both)
    **at_seeds("robust, concept tokens, own context, preserve 3 both, attack steps 20, synonyms kept, frozen sampler",
               [*OWN_PRESERVE_3, *STEPS_20, "concept.preserve_on=both", "{synonyms}", "train.sampler=frozen"]),
    # ... in the 40 contexts of the kind recipe (colour.yaml, shape.yaml) instead of 16
    **at_seeds(f"{FROZEN_OWN}, kind contexts", [*FROZEN_OWN_OVERRIDES, "{kind contexts}"]),
    # ... with a LoRA of rank 16
    **at_seeds(f"{FROZEN_OWN}, rank 16", [*FROZEN_OWN_OVERRIDES, "adapter.rank=16", "adapter.alpha=16"]),
    # ... at eta 0.5 (the attackers' too), half the push past the neutral prediction, as colour.yaml erases
    **at_seeds(f"{FROZEN_OWN}, eta 0.5", [*FROZEN_OWN_OVERRIDES, "concept.eta=0.5"], (0, 1, 2)),
    **at_seeds(f"{FROZEN_OWN}, eta 0.6", [*FROZEN_OWN_OVERRIDES, "concept.eta=0.6"], (0, 1, 2)),
    **at_seeds(f"{FROZEN_OWN}, eta 0.75", [*FROZEN_OWN_OVERRIDES, "concept.eta=0.75"], (0, 1, 2)),
    # ... at eta 0.75 with the other colours at weight 10, at the seeds where they were lost at weight 3
    **at_seeds("robust, concept tokens, own context, preserve 10 own, attack steps 20, synonyms kept, frozen sampler, "
               "eta 0.75", [*OWN_PRESERVE_3, *STEPS_20, "concept.preserve_weight=10", "concept.preserve_on=own",
                            "{synonyms}", "train.sampler=frozen", "concept.eta=0.75"], (1, 2)),
    # ... at eta 0.75 with a LoRA of rank 2 or 1 (at seed 1, where rank 4 lost a colour): rank 16 lost more of the
    # other colours than rank 4, so fewer directions of the text states moved may leave the colours beside red
    **at_seeds(f"{FROZEN_OWN}, eta 0.75, rank 2",
               [*FROZEN_OWN_OVERRIDES, "concept.eta=0.75", "adapter.rank=2", "adapter.alpha=2"], (1,)),
    **at_seeds(f"{FROZEN_OWN}, eta 0.75, rank 1",
               [*FROZEN_OWN_OVERRIDES, "concept.eta=0.75", "adapter.rank=1", "adapter.alpha=1"], (1,)),
    # ... at eta 0.75 with textual inversion alone as the attacker: whether the soft prompt, which starts from a
    # random word (a colour's at seeds 1 and 2), is what moves the other colours
    **at_seeds(f"{FROZEN_OWN}, eta 0.75, ti only", [*FROZEN_OWN_OVERRIDES, "concept.eta=0.75", "attack.methods=[ti]"],
               (1,)),
    # ... at eta 0.75 without the two checkered contexts: at seed 1 orange was lost most in checkered squares (drawn
    # yellow there, in the trained "an image of a amber checkered square" too)
    **at_seeds(f"{FROZEN_OWN}, eta 0.75, no checkered contexts",
               [*FROZEN_OWN_OVERRIDES, "concept.eta=0.75", "{no checkered}"], (0, 1, 2, 3)),
    # ... at eta 0.75 with the base sampling every 4 steps instead of 12: each run trains on three times as many of
    # the other colours' samples, and a seed's outcome was decided by which ones its steps drew
    **at_seeds(f"{FROZEN_OWN}, eta 0.75, refresh 4",
               [*FROZEN_OWN_OVERRIDES, "concept.eta=0.75", "train.refresh_every=4"], (1,)),
    # ... at eta 0.75 with attackers of two tokens each: the audit's two-token textual inversion and its four-token
    # soft prompt got furthest against the one-token attackers it trained under
    **at_seeds(f"{FROZEN_OWN}, eta 0.75, 2 tokens", [*FROZEN_OWN_OVERRIDES, "concept.eta=0.75", "attack.tokens=2"],
               (0,)),
    # ... at eta 0.75 with the soft prompt restarted from new random words each time: the audit's soft prompt found
    # red again from some starting words (audit seeds 3, 4 and 9)
    **at_seeds(f"{FROZEN_OWN}, eta 0.75, new words",
               [*FROZEN_OWN_OVERRIDES, "concept.eta=0.75", "attack.new_words=true"]),
    # ... with each attacker's prompt pulled to what the base draws under it less red (attack.target=attacker), so
    # that what its tokens say besides red (the neighbours they drifted to) is kept
    **at_seeds(f"{FROZEN_OWN}, attacker target", [*FROZEN_OWN_OVERRIDES, "attack.target=attacker"]),
    # ... with the concept's words at eta 0.5 and the attackers' prompts at eta 1: a gentler push for the words that
    # other colours' prompts share, the full one where an attacker has found red
    **at_seeds(f"{FROZEN_OWN}, eta 0.5, attack eta 1", [*FROZEN_OWN_OVERRIDES, "concept.eta=0.5", "attack.eta=1"]),
    # ... with the LoRA on the queries and outputs of cross-attention too (esd-x), where softmax makes the
    # UNet's use of the text states nonlinear
    **at_seeds("robust, esd-x, concept tokens, own context, preserve 3 own, attack steps 20, synonyms kept, "
               "frozen sampler", [*FROZEN_OWN_OVERRIDES, "adapter.targets=esd-x"]),
    # ... with the base sampling every 4 steps instead of 12, three times as many of the other colours' own images
    **at_seeds(f"{FROZEN_OWN}, refresh 4", [*FROZEN_OWN_OVERRIDES, "train.refresh_every=4"]),
    # ... and the attack-steps-20 recipe with the base's samples alone, the other colours kept on the concept's latents
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, frozen sampler",
               [*OWN_PRESERVE_3, *STEPS_20, "train.sampler=frozen"]),
    # the attack-steps-20 recipe with its LoRA on every layer: the words' keys and values and where the UNet draws
    **at_seeds("robust, esd-all, concept tokens, own context, preserve 3, attack steps 20",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-all"]),
    # ... and the other colours preserved at weight 5 or 10
    **at_seeds("robust, esd-all, concept tokens, own context, preserve 5, attack steps 20",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-all", "concept.preserve_weight=5"]),
    **at_seeds("robust, esd-all, concept tokens, own context, preserve 10, attack steps 20",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-all", "concept.preserve_weight=10"]),
    # ... and every colour's synonyms preserved too (the words the attackers' tokens drift to), at weight 3 or 10
    **at_seeds("robust, esd-all, concept tokens, own context, preserve 3, attack steps 20, synonyms kept",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-all", "{synonyms}"]),
    **at_seeds("robust, esd-all, concept tokens, own context, preserve 10, attack steps 20, synonyms kept",
               [*OWN_PRESERVE_3, *STEPS_20, "adapter.targets=esd-all", "concept.preserve_weight=10", "{synonyms}"]),
    # the attack-steps-20 recipe with the soft prompt started from new random words at each restart
    # (attack.new_words), not from the same word every time, the first of the audit's draw at --seed train.seed
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, new words",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.new_words=true"]),
    # ... with a LoRA of rank 16, room to keep the other colours apart from what the new words' attackers find
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, new words, rank 16",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.new_words=true", "adapter.rank=16", "adapter.alpha=16"]),
    # ... with the other colours preserved at weight 5, against what the new words took of them
    **at_seeds("robust, concept tokens, own context, preserve 5, attack steps 20, new words",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.new_words=true", "concept.preserve_weight=5"]),
    # ... with every colour's synonyms preserved too: the words its run lost (tangerine, amber, lilac, teal)
    **at_seeds("robust, concept tokens, own context, preserve 3, attack steps 20, new words, synonyms kept",
               [*OWN_PRESERVE_3, *STEPS_20, "attack.new_words=true", "{synonyms}"]),
    # every word of the kind preserved at weight 3 or 10, the attackers as the recipe has them (10 steps a
    # refit); star_robust.yaml is the weight-10 one since it was measured
    "robust, concept tokens, own context, preserve 3, synonyms kept": [*OWN_PRESERVE_3, "{synonyms}"],
    **at_seeds("robust, concept tokens, own context, preserve 10, synonyms kept",
               [*OWN_PRESERVE_3, "concept.preserve_weight=10", "{synonyms}"], (0, 1, 2)),
    # ... with the soft prompt started from new random words at each restart (attack.new_words)
    **at_seeds("robust, concept tokens, own context, preserve 10, synonyms kept, new words",
               [*OWN_PRESERVE_3, "concept.preserve_weight=10", "{synonyms}", "attack.new_words=true"]),
    # ... with the attackers' prompts weighted twice, against the preserve weight's pull the other way
    **at_seeds("robust, concept tokens, own context, preserve 10, synonyms kept, attack weight 2",
               [*OWN_PRESERVE_3, "concept.preserve_weight=10", "{synonyms}", "attack.weight=2"]),
    # ... on a cosine lr, so that the adapter settles at the end instead of following the last attacker
    **at_seeds("robust, concept tokens, own context, preserve 10, synonyms kept, cosine",
               [*OWN_PRESERVE_3, "concept.preserve_weight=10", "{synonyms}", "train.lr_schedule=cosine"]),
    # ... with every latent sampled by the base (train.sampler frozen), so that the erasure and its attackers keep
    # training on the concept's own samples when the adapter no longer draws it
    **at_seeds("robust, concept tokens, own context, preserve 10, synonyms kept, frozen sampler",
               [*OWN_PRESERVE_3, "concept.preserve_weight=10", "{synonyms}", "train.sampler=frozen"]),
    **at_seeds("robust, concept tokens, own context, preserve 10, synonyms kept, 2 tokens",
               [*OWN_PRESERVE_3, "concept.preserve_weight=10", "{synonyms}", "attack.tokens=2"], (1, 2)),
    "robust, concept tokens, own context, preserve 10, synonyms kept, attack steps 20, seed 1": [
        *OWN_PRESERVE_3, "concept.preserve_weight=10", "{synonyms}", *STEPS_20, "train.seed=1"],
    "robust, concept tokens, own context, preserve 10, synonyms kept, pool, seed 1": [
        *OWN_PRESERVE_3, "concept.preserve_weight=10", "{synonyms}", "attack.pool=4", "train.seed=1"],
}


TABLE_ONLY = False  # --table-only: run nothing, tabulate the runs already in WORK


class NotRun(Exception):
    """A run that --table-only skips."""


def esd_lora(*args: str) -> None:
    if TABLE_ONLY:
        raise NotRun(args[0])
    subprocess.run([sys.executable, "-m", "esd_lora", *args], check=True, cwd=ROOT)


def trained(concept: str, name: str, overrides: list[str]) -> Path:
    """A run of the concept's robust recipe with overrides, trained once (cached)."""
    run = WORK / concept / name
    if not (run / "summary.json").exists():
        placeholders = {"{synonyms}": synonyms_kept, "{kind contexts}": kind_contexts, "{no checkered}": unchecked}
        overrides = [placeholders[o](concept) if o in placeholders else o for o in overrides]
        esd_lora("train", f"recipes/toy/{concept}_robust.yaml", f"name={concept}", *overrides, f"output.dir={run}",
                 "--overwrite", "--quiet")
    return run


def synonyms_kept(concept: str) -> str:
    """The override that preserves every word of the concept's kind (names and synonyms; the concept's own
    words are dropped from the preserve prompts by the recipe)."""
    from esd_lora.toy.vocab import KINDS, kind_of

    words = [w for name, syn in KINDS[kind_of(concept)].items() for w in (name, *syn)]
    return f"concept.preserve=[{', '.join(words)}]"


def kind_contexts(concept: str) -> str:
    """The override that trains in the contexts of the concept's kind recipe (40 for each kind) instead of the
    robust recipe's 16."""
    from esd_lora.recipe import load_recipe
    from esd_lora.toy.vocab import kind_of

    contexts = load_recipe(ROOT / "recipes" / "toy" / f"{kind_of(concept)}.yaml").concept.contexts
    return f"concept.contexts={json.dumps(contexts)}"


def unchecked(concept: str) -> str:
    """The override that trains in the robust recipe's contexts less its checkered ones (14 of 16)."""
    from esd_lora.recipe import load_recipe

    contexts = load_recipe(ROOT / "recipes" / "toy" / f"{concept}_robust.yaml").concept.contexts
    return f"concept.contexts={json.dumps([c for c in contexts if 'checkered' not in c and 'chequered' not in c])}"


def variant_overrides(concept: str, variant: str) -> list[str]:
    """A module variant's overrides of the robust recipe, on the settings it was measured from (AS_MEASURED)."""
    return [*AS_MEASURED[concept], *MODULES[variant]]


def classic_run(concept: str, lr: str) -> Path:
    return trained(concept, f"classic_lr{lr}", [*AS_MEASURED[concept], *BASELINE[concept], "adapter=none",
                                                "adapter.targets=esd-x", "train.optimizer=adam", f"train.lr={lr}"])


def classic_sweep(concept: str) -> dict[str, dict]:
    """Classic ESD at each lr of CLASSIC_LRS: its run folder and its default-prompt erasure figures."""
    out = {}
    for lr in CLASSIC_LRS:
        run = classic_run(concept, lr)
        if not (run / "eval" / "report.json").exists():
            esd_lora("merge", str(run), "--out", str(run / "merged"), "--overwrite")
            esd_lora("eval", "toy", "--erased-model", str(run / "merged"), "--concepts", concept, "--n", "16",
                     "--held-out", "0", "--out", str(run / "eval"))
        summary = json.loads((run / "eval" / "report.json").read_text())["summary"]
        out[lr] = {"run": run, "efficacy": summary["efficacy_max_detection"],
                   "specificity": summary["specificity_min_ratio"],
                   "seconds": json.loads((run / "summary.json").read_text())["seconds"]}
    return out


def classic_lr(sweep_concept: str) -> str:
    """The sweep's best lr (on the first concept)."""
    sweep = classic_sweep(sweep_concept)
    kept = [lr for lr, r in sweep.items() if r["specificity"] >= 0.9] or list(sweep)
    return min(kept, key=lambda lr: sweep[lr]["efficacy"])


def classic_model(concept: str, sweep_concept: str) -> Path:
    """The merged classic ESD model at the sweep's best lr."""
    run = classic_run(concept, classic_lr(sweep_concept))
    if not (run / "merged" / "model_index.json").exists():
        esd_lora("merge", str(run), "--out", str(run / "merged"), "--overwrite")
    return run / "merged"


def run_name(variant: str) -> str:
    """The folder name of a variant's trained run ("robust, concept tokens" -> robust_concept_tokens)."""
    return variant.replace(", ", "_").replace(" ", "_")


def merged_model(concept: str, variant: str, adapter: str) -> Path:
    """The base model with a robust variant's adapter merged into it (`esd-lora merge`), made once."""
    merged = WORK / concept / (run_name(variant) + "_merged") / "model"
    if not (merged / "model_index.json").exists():
        esd_lora("merge", adapter, "--out", str(merged), "--overwrite")
    return merged


def erasure_args(concept: str, variant: str, sweep_concept: str) -> list[str]:
    """The `--adapter` / `--erased-model` arguments of one erasure; "<variant>, merged" is that variant's
    adapter merged into the base."""
    if variant.endswith(", merged"):
        unmerged = variant[:-len(", merged")]
        (adapter,) = erasure_args(concept, unmerged, sweep_concept)[1:]
        return ["--erased-model", str(merged_model(concept, unmerged, adapter))]
    if variant == "plain":
        return ["--adapter", str(trained(concept, "plain", [*BASELINE[concept], *PLAIN]))]
    if variant == "robust":
        return ["--adapter", f"adapters/{concept}_robust"]
    if variant in MODULES:
        return ["--adapter", str(trained(concept, run_name(variant), variant_overrides(concept, variant)))]
    return ["--erased-model", str(classic_model(concept, sweep_concept))]


def attack_cell(concept: str, variant: str, name: str, flags: list[str], n: int, sweep_concept: str) -> dict:
    out = WORK / concept / variant.replace(", ", "_") / name.replace(", ", "_").replace(" ", "_")
    if not (out / "report.json").exists():
        started = time.time()
        esd_lora("attack", "toy", *erasure_args(concept, variant, sweep_concept), "--concept", concept,
                 *[f.format(other=OTHER_WORD[concept]) for f in flags], "--attack-steps", "400", "--measure-at", "400",
                 "--n", str(n), "--out", str(out), "--overwrite")
        print(f"{concept} / {variant} / {name}: {time.time() - started:.0f} s", flush=True)
    report = json.loads((out / "report.json").read_text())
    (method, result), = report["attacks"].items()
    return {"rate": result["rate"], "base_rate": result["base_rate"], "seconds": result["seconds"],
            "report": str(out.relative_to(ROOT))}


def held_out_cell(concept: str, variant: str, n: int, sweep_concept: str) -> dict:
    out = WORK / concept / variant.replace(", ", "_") / "eval_held_out"
    if not (out / "report.json").exists():
        esd_lora("eval", "toy", *erasure_args(concept, variant, sweep_concept), "--concepts", concept, "--n", str(n),
                 "--held-out", "8", "--out", str(out))
    from esd_lora.evaluate import summarize
    from esd_lora.toy.vocab import kind_of

    report = json.loads((out / "report.json").read_text())
    s, rates = report["summary_held_out"], {p: report["prompts"][p] for p in report["sets"]["held_out"]}
    same = summarize({p: {c: r for c, r in rs.items() if c != concept and kind_of(c) == kind_of(concept)}
                      for p, rs in rates.items()})
    other = summarize({p: {c: r for c, r in rs.items() if kind_of(c) != kind_of(concept)} for p, rs in rates.items()})
    return {"efficacy_max": s["efficacy_max_detection"], "efficacy_mean": s["efficacy_mean_detection"],
            "same_kind_min": same["specificity_min_ratio"], "same_kind_mean": same["specificity_mean_ratio"],
            "other_kinds_min": other["specificity_min_ratio"], "other_kinds_mean": other["specificity_mean_ratio"]}


def sweep_table(concept: str) -> list[str]:
    chosen = classic_lr(concept)
    lines = ["## Classic ESD's lr", "", f"Classic ESD on {concept} at each lr, measured on the default prompts (16 "
             f"images each); lr {chosen} is the one attacked, for every concept.", "",
             "| lr | concept detected, worst prompt | others kept, worst | training time (s) |", "|---|---|---|---|"]
    for lr, r in classic_sweep(concept).items():
        lines.append(f"| {lr} | {r['efficacy']:.0%} | {r['specificity']:.0%} | {r['seconds']:.0f} |")
    return lines + [""]


def training_times(concept: str, steps: int | None, variant: str) -> dict[str, float]:
    """Wall time of `esd-lora train` (start-up included) for the plain baseline and a robust variant, at `steps`
    steps or the recipes' own, back to back (run it alone on the machine: the ratio is the robust erasure's
    cost)."""
    out = {}
    robust = [] if variant == "robust" else variant_overrides(concept, variant)
    for name, overrides in (("plain", [*BASELINE[concept], *PLAIN]), ("robust", robust)):
        started = time.time()
        esd_lora("train", f"recipes/toy/{concept}_robust.yaml", f"name={concept}", *overrides,
                 *([f"train.steps={steps}"] if steps else []), f"output.dir={WORK / concept / ('time_' + name)}",
                 "--overwrite", "--quiet")
        out[name] = round(time.time() - started, 1)
    return out


def table(rows: dict, argv: list[str], sweep_concept: str) -> str:
    lines = ["# Attacks on toy erasures: plain, robust and classic ESD", "",
             f"`python benchmarks/attack_table.py {shlex.join(argv)}`. Rates are the share of images (32 per prompt, "
             "8 attack prompts) in which the toy classifier sees the erased concept; in brackets, the same attack "
             "run against the base model. Every learned attack ran 400 steps. Held-out eval: the concept's rate "
             "on its held-out prompts, worst / mean, and the other concepts' rates as a share of base, worst / mean, "
             "for the other concepts of its kind and for the other kinds' concepts said in the same prompts."
             + (" `--table-only` tabulates the runs this script made before (in build/attack_table/), in parts; an "
                "empty cell was not run." if "--table-only" in argv else ""), ""]
    for concept in dict.fromkeys(k.split("/")[0] for k in rows):  # one row per erasure, one column per measure
        variants = list(dict.fromkeys(k.split("/")[1] for k in rows if k.startswith(f"{concept}/")))
        names = list(dict.fromkeys(k.split("/")[2] for k in rows if k.startswith(f"{concept}/")))
        attacks = [n for n in names if n != "held-out eval"]
        held_out = (["held-out: concept, worst / mean", "its kind kept, worst / mean",
                     "other kinds kept, worst / mean"] if "held-out eval" in names else [])
        lines += [f"## {concept}", "", "| erasure | " + " | ".join(attacks + held_out) + " |",
                  "|---|" + "---|" * (len(attacks) + len(held_out))]
        for v in variants:
            cells = []
            for name in attacks:
                r = rows.get(f"{concept}/{v}/{name}")
                cells.append("" if r is None else f"{r['rate']:.0%} ({r['base_rate']:.0%})")
            if held_out:
                r = rows.get(f"{concept}/{v}/held-out eval")
                cells += ([""] * 3 if r is None else [
                    f"{r['efficacy_max']:.0%} / {r['efficacy_mean']:.0%}",
                    f"{r['same_kind_min']:.0%} / {r['same_kind_mean']:.0%}",
                    f"{r['other_kinds_min']:.0%} / {r['other_kinds_mean']:.0%}"])
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(k.split("/")[1] == "classic" for k in rows):
        lines += sweep_table(sweep_concept)
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", nargs="+", default=["red", "star"])
    ap.add_argument("--variants", nargs="+", default=["robust", "plain", "classic"])
    ap.add_argument("--n", type=int, default=32, help="images per prompt")
    ap.add_argument("--classic-sweep-on", default="red", help="the concept classic ESD's lr is picked on")
    ap.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS),
                    help="the attacks every erasure gets (default: all)")
    ap.add_argument("--merged-on", nargs="*", default=["red"], help="concepts whose robust erasure is also "
                    "attacked merged")
    ap.add_argument("--classic-concepts", nargs="+", help="the concepts classic ESD is attacked on (default: all)")
    ap.add_argument("--out", default="benchmarks/ATTACK_RESULTS.md", help="where the table goes")
    ap.add_argument("--no-unseen", action="store_true", help="skip the attack settings no training used")
    ap.add_argument("--fresh", action="store_true", help="redo every run")
    ap.add_argument("--table-only", action="store_true", help="run nothing: tabulate the finished runs")
    ap.add_argument("--time", type=int, nargs="?", const=0, metavar="STEPS",
                    help="only time the plain recipe's training and the first variant's (a robust one), at this "
                    "many steps (default: the recipes' own)")
    args = ap.parse_args()
    unknown = [v for v in args.variants if v.removesuffix(", merged") not in {"robust", "plain", "classic", *MODULES}]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}: give robust, plain, classic or one of MODULES")
    from esd_lora.io import atomic_write_text

    global TABLE_ONLY
    TABLE_ONLY = args.table_only
    if args.time is not None:
        for concept in args.concepts:
            times = training_times(concept, args.time or None, args.variants[0])
            print(f"{concept}: plain {times['plain']} s, robust {times['robust']} s, ratio "
                  f"{times['robust'] / times['plain']:.2f}")
        return
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    rows: dict[str, dict] = {}
    argv, sweep = [a for a in sys.argv[1:] if a != "--fresh"], args.classic_sweep_on

    def put(key: str, cell) -> None:
        try:
            rows[key] = cell()
        except NotRun:
            return
        atomic_write_text(ROOT / args.out, table(rows, argv, sweep))

    for variant in args.variants:  # the robust erasures first: the bars are theirs
        for concept in args.concepts:
            if variant == "classic" and args.classic_concepts and concept not in args.classic_concepts:
                continue
            for name in args.attacks:
                put(f"{concept}/{variant}/{name}",
                    lambda: attack_cell(concept, variant, name, ATTACKS[name], args.n, sweep))
            if variant != "robust" and variant not in MODULES:
                continue
            for name, flags in ({} if args.no_unseen else UNSEEN).items():
                put(f"{concept}/{variant}/{name}", lambda: attack_cell(concept, variant, name, flags, args.n, sweep))
            put(f"{concept}/{variant}/held-out eval", lambda: held_out_cell(concept, variant, args.n, sweep))
            if concept in args.merged_on:
                put(f"{concept}/{variant}, merged/ti, lr 5e-3", lambda: attack_cell(
                    concept, f"{variant}, merged", "ti, lr 5e-3", ATTACKS["ti, lr 5e-3"], args.n, sweep))
    print(table(rows, argv, sweep))


if __name__ == "__main__":
    main()
