"""Recipes: what to erase, from which model, with which adapter and training settings.

A recipe is YAML validated against the dataclasses below before anything heavy loads.
Any key can be overridden as `section.key=value`. Every error is one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import RecipeError


@dataclass
class ModelSection:
    """The base model: `toy`, a local diffusers folder or a hub id."""

    id: str = "toy"
    revision: str | None = None
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


@dataclass
class ConceptSection:
    """What to erase.

    prompts: one is picked per sample. erase_from: the subject the concept is erased from, as a
    prompt without the concept ("a circle" for "a red circle"); one for every prompt, or one per prompt.
    It takes the empty prompt's place in ESD's guidance, so only what the concept adds to the subject
    is erased. eta: guidance strength of the erasure. preserve: prompts whose predictions must not
    change, weighted by preserve_weight, on the latents sampled for the erased prompts (preserve_on
    `erased`, no extra sampling) or on latents sampled from the preserve prompts themselves (`own`, twice
    the sampling), which holds concepts that sit close to the erased one, or on both (`both`, each weighted
    preserve_weight). A preserve prompt that is also a concept prompt is dropped, so a recipe can list a
    whole kind once and take any one of it as the concept. contexts: templates with `{}` ("a photo of a
    {} star"); each concept and preserve prompt is trained in every one of them, so that the erasure is
    about the concept, not about one sentence.
    """

    prompts: list[str] = field(default_factory=list)
    erase_from: list[str] = field(default_factory=list)
    eta: float = 1.0
    preserve: list[str] = field(default_factory=list)
    preserve_weight: float = 1.0
    preserve_on: Literal["erased", "own", "both"] = "erased"
    contexts: list[str] = field(default_factory=list)

    def subject(self, i: int) -> str:
        """The erase_from subject of prompt i."""
        return self.erase_from[i if len(self.erase_from) > 1 else 0]

    def trained(self) -> ConceptSection:
        """The prompts training sees: each in every context, the preserve prompts without the concept's."""
        def place(prompts: list[str]) -> list[str]:
            return [c.format(p) for p in prompts for c in self.contexts] if self.contexts else list(prompts)

        subjects = ([c.format(self.subject(i)) for i in range(len(self.prompts)) for c in self.contexts]
                    if self.contexts and self.erase_from else list(self.erase_from))
        preserve = [p for p in self.preserve if p not in self.prompts]
        return dataclasses.replace(self, prompts=place(self.prompts), erase_from=subjects, preserve=place(preserve),
                                   contexts=[])


@dataclass
class AdapterSection:
    """kind `lora` trains a PEFT LoRA adapter; `none` trains the selected weights directly (classic ESD).

    targets: the UNet's layers. text_encoder: the text encoder's layers to adapt as well (a preset `attn`,
    `mlp` or `all`, a regex or a list; empty: none), with the same rank and alpha: the erasure can then
    change what the concept's words mean before the UNet reads them, where a learned token enters too.
    concept_tokens: train the text encoder's input embedding of the words that name the concept (the words of
    concept.prompts that no context, neutral or preserve prompt uses) and nothing else of it: every prompt
    without those words is encoded exactly as before, so the erasure cannot reach other concepts' prompts
    through the text encoder. Not with text_encoder (one text-encoder adapter at a time)."""

    kind: Literal["lora", "none"] = "lora"
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    init: Literal["default", "gaussian"] = "default"
    targets: str | list[str] = "esd-x"
    text_encoder: str | list[str] = ""
    concept_tokens: bool = False


@dataclass
class TrainSection:
    """Optimisation and the x_t sampler. sampler `trained` is the paper's (the adapter on); `frozen` uses the base.

    token_lr: the lr of retrained token rows (adapter.concept_tokens; default train.lr), on the same schedule.
    Adam moves every weight by about the lr per step and an embedding's entries are much smaller than a LoRA
    matrix's: on the toy at lr 2e-3 the rows move 2-3 times their own length. A lower token_lr keeps them
    near real words' embeddings (on the toy's green, a tenth of the lr also erased less).
    lr 0 with a token_lr: the rows alone carry the erasure and the LoRA stays zero. A row is read in every
    context the word appears in, so that erasure holds across phrasings (on the toy, better than beside a
    trained K/V LoRA, which fits the trained contexts), but it is about the words: the UNet still draws the
    concept for anyone who finds another way to say it (a learned token, a word not listed).

    refresh_every 1 is the paper's sampling: a fresh partial DDIM run for every step, most of a step's
    compute. N > 1 samples one full run of `batch` images every N steps and trains each step on a latent
    of each image at a random index (one run covers every index), with the current adapter at each refresh.
    """

    steps: int = 200
    lr: float = 1e-3
    token_lr: float | None = None
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    batch: int = 1
    optimizer: Literal["adamw8bit", "adamw", "adam"] = "adamw8bit"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    ddim_steps: int = 25
    guidance: float = 3.0
    sampler: Literal["trained", "frozen"] = "trained"
    refresh_every: int = 12


@dataclass
class AttackSection:
    """Robust erasure: train against attackers as the erasure forms (off while `methods` is empty).

    Every `every` training steps, each attacker takes `steps` Adam steps (lr `lr`, `batch` latents) on
    `tokens` new token embeddings that bring the concept back on the model as it is then, by the diffusion
    loss on `images` samples of the concept prompts by the base model: textual inversion (`ti`, the tokens
    in place of the concept's word, each sample captioned with its own context from concept.contexts, or
    with one of `templates` when given; starting from the word `init`, default the first concept prompt)
    and/or a soft prompt (`soft-prompt`, the tokens before each sample's concept prompt, starting from
    random words). The tokens carry over from one refit to the next, so an attacker grows with the erasure,
    and start again from their initial values every `restart_every` refits (0: never), so that the erasure
    also meets fresh attacks late in training. Each training step then also pulls the model's prediction
    under every attacker's prompts to the concept's ESD target, weighted by `weight`: under `any` of them
    (`context`), or under the one of each latent's own prompt (`own`: ti, its context with the tokens for the
    concept; soft-prompt, the tokens before it), so that the target and the prompt say the same context.
    `target` is what that prediction is pulled to: the concept's ESD target (`concept`), or the frozen
    model's prediction under the attacker's prompt less 1 + eta times what the concept adds to its subject
    (`attacker`): the concept's target where the tokens say the concept and nothing else, and whatever else
    they say (the other words they drifted to) kept. `eta` is the concept's eta in the attackers' targets
    (default concept.eta): 0 pulls their prediction to the neutral prompt's and no further, so that they are
    not pushed to what lies opposite the concept. `pool`: how many earlier attackers each method keeps (its
    tokens as they were just before each restart, the latest `pool`); every step also trains under one of
    them, picked at random, so that closing the current attack does not reopen an earlier one. `new_words`: the
    soft prompt starts from new random words at every restart, from a stream seeded by the training seed and
    the restart as a string, which no integer `esd-lora attack --seed` reproduces, so the erasure meets many
    starts and not the audit's draw (single words can still coincide on a small vocabulary); off, every
    restart starts from the same words, the first words of the audit's draw at `--seed` equal to train.seed.
    The adapter stays a LoRA on the UNet, so it merges as any other.
    """

    methods: list[Literal["ti", "soft-prompt"]] = field(default_factory=list)
    tokens: int = 1
    steps: int = 10
    lr: float = 5e-2
    every: int = 10
    restart_every: int = 0
    batch: int = 8
    images: int = 64
    init: str = ""
    templates: list[str] = field(default_factory=list)
    weight: float = 1.0
    context: Literal["any", "own"] = "any"
    target: Literal["concept", "attacker"] = "concept"
    eta: float | None = None
    pool: int = 0
    new_words: bool = False


@dataclass
class OutputSection:
    """Where the adapter goes (default runs/<recipe name>/, never the shipped adapters/) and how often to
    checkpoint (0: never)."""

    dir: str | None = None
    checkpoint_every: int = 50


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelSection = field(default_factory=ModelSection)
    concept: ConceptSection = field(default_factory=ConceptSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train: TrainSection = field(default_factory=TrainSection)
    attack: AttackSection = field(default_factory=AttackSection)
    output: OutputSection = field(default_factory=OutputSection)

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name != "name"}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check one value against a field's type annotation; coerce numeric strings such as '1e-4'."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[-1])
    if origin is Literal:
        allowed = typing.get_args(kind)
        if isinstance(value, bool) and "no" in allowed and value is False:
            return "no"  # YAML reads a bare `no` as false
        if value not in allowed:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise RecipeError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value) if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            pass
        try:
            number = float(str(value))
        except ValueError:
            raise RecipeError(f"{key}: expected an integer, got {value!r}") from None
        if not (math.isfinite(number) and number.is_integer()):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise RecipeError(f"{key}: expected a finite number, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, (dict, list)) or value is None:
            raise RecipeError(f"{key}: expected a string, got {type(value).__name__}")
        return str(value)
    raise RecipeError(f"{key}: unsupported type")  # pragma: no cover - schema bug


def _shorthand(name: str, data: Any) -> Any:
    """`adapter: none` stands for `adapter: {kind: none}`; a missing section is its defaults."""
    if data is None:
        return {}
    if name == "adapter" and isinstance(data, str):
        return {"kind": data}
    return data


def _section(name: str, cls: type, data: Any) -> Any:
    data = _shorthand(name, data)
    if not isinstance(data, dict):
        raise RecipeError(f"{name}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise RecipeError(f"{name}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return cls(**{key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in data.items()})


def _check(recipe: Recipe) -> None:
    """Cross-field rules that types cannot say."""
    c, a, t, o = recipe.concept, recipe.adapter, recipe.train, recipe.output
    if not c.prompts or any(not p.strip() for p in c.prompts):
        raise RecipeError("concept.prompts: give at least one non-empty prompt to erase")
    rules = [
        ("concept.eta", 0 < c.eta <= 1000, "must be in (0, 1000]"),
        ("concept.preserve_weight", 0 <= c.preserve_weight <= 1e6, "must be in [0, 1e6]"),
        ("concept.erase_from", len(c.erase_from) in (0, 1, len(c.prompts)),
         f"give one subject, or one per concept prompt ({len(c.prompts)})"),
        ("adapter.rank", 1 <= a.rank <= 1024, "must be in [1, 1024]"),
        ("adapter.alpha", 0 < a.alpha <= 1e6, "must be in (0, 1e6]"),
        ("adapter.dropout", 0 <= a.dropout < 1, "must be in [0, 1)"),
        ("adapter.targets", bool(a.targets), "must name a preset, a regex or a list of modules"),
        ("train.steps", 1 <= t.steps <= 10_000_000, "must be in [1, 1e7]"),
        ("train.lr", 0 <= t.lr <= 1, "must be in [0, 1]"),
        ("train.token_lr", t.token_lr is None or 0 < t.token_lr <= 1, "must be in (0, 1]"),
        ("train.warmup_steps", 0 <= t.warmup_steps <= t.steps, "must be in [0, train.steps]"),
        ("train.batch", 1 <= t.batch <= 1024, "must be in [1, 1024]"),
        ("train.ddim_steps", 1 <= t.ddim_steps <= 1000, "must be in [1, 1000]"),
        ("train.guidance", 1 <= t.guidance <= 100, "must be in [1, 100]"),
        ("train.refresh_every", 1 <= t.refresh_every <= 1_000_000, "must be in [1, 1e6]"),
        ("train.seed", 0 <= t.seed < 2**31, "must be in [0, 2^31)"),
        ("output.checkpoint_every", o.checkpoint_every >= 0, "must be >= 0"),
        ("attack.tokens", 1 <= recipe.attack.tokens <= 16, "must be in [1, 16]"),
        ("attack.steps", 1 <= recipe.attack.steps <= 100_000, "must be in [1, 1e5]"),
        ("attack.lr", 0 < recipe.attack.lr <= 10, "must be in (0, 10]"),
        ("attack.every", 1 <= recipe.attack.every <= 1_000_000, "must be in [1, 1e6]"),
        ("attack.restart_every", 0 <= recipe.attack.restart_every <= 1_000_000, "must be in [0, 1e6]"),
        ("attack.methods", len(set(recipe.attack.methods)) == len(recipe.attack.methods), "names a method twice"),
        ("attack.batch", 1 <= recipe.attack.batch <= 1024, "must be in [1, 1024]"),
        ("attack.images", 1 <= recipe.attack.images <= 100_000, "must be in [1, 1e5]"),
        ("attack.weight", 0 <= recipe.attack.weight <= 1e6, "must be in [0, 1e6]"),
        ("attack.eta", recipe.attack.eta is None or 0 <= recipe.attack.eta <= 1e3, "must be in [0, 1000]"),
        ("attack.pool", 0 <= recipe.attack.pool <= 1000, "must be in [0, 1000]"),
    ]
    if a.text_encoder and a.kind != "lora":
        rules.append(("adapter.text_encoder", False, "a text-encoder adapter needs adapter.kind lora"))
    if a.concept_tokens and a.kind != "lora":
        rules.append(("adapter.concept_tokens", False, "trained token embeddings need adapter.kind lora"))
    if t.token_lr is not None and not a.concept_tokens:
        rules.append(("train.token_lr", False, "sets the lr of retrained token rows; it needs adapter.concept_tokens"))
    if t.lr == 0 and not (a.concept_tokens and t.token_lr):
        rules.append(("train.lr", False, "0 leaves the LoRA untrained, so it needs the concept's rows to train "
                      "instead: adapter.concept_tokens and train.token_lr"))
    if t.lr == 0 and c.trained().preserve:
        rules.append(("concept.preserve", False, "with train.lr 0 only the concept's rows train, and no preserve "
                      "prompt says those words, so its loss is always zero; give concept.preserve=[]"))
    if a.concept_tokens and a.text_encoder:
        rules.append(("adapter.concept_tokens", False, "give either adapter.text_encoder or concept_tokens, "
                      "not both: the text encoder takes one adapter"))
    if any(c.count("{}") != 1 for c in recipe.concept.contexts):
        rules.append(("concept.contexts", False, "each context needs exactly one {} where the prompt goes"))
    if recipe.attack.new_words and "soft-prompt" not in recipe.attack.methods:
        rules.append(("attack.new_words", False, "draws the soft prompt's starting words; it needs soft-prompt in "
                      "attack.methods"))
    if any(c.count("{}") != 1 for c in recipe.attack.templates):
        rules.append(("attack.templates", False, "each template needs exactly one {} where the tokens go"))
    if {recipe.model.dtype, t.mixed_precision} == {"fp16", "bf16"}:
        rules.append(("train.mixed_precision", False, f"{t.mixed_precision} autocast over model.dtype "
                      f"{recipe.model.dtype} weights mixes two half-precision types; use the same one for both"))
    for key, ok, message in rules:
        if not ok:
            raise RecipeError(f"{key}: {message}")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", recipe.name):
        raise RecipeError(f"name: {recipe.name!r} may only use letters, digits, '_', '.' and '-', and may not "
                          "start with '.'")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=200` -> (['train', 'steps'], 200); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise RecipeError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def from_dict(data: dict[str, Any], overrides: list[str] = (), name: str | None = None) -> Recipe:
    """Validate a recipe mapping, after applying `key=value` overrides."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: expected a mapping at the top level, got {type(data).__name__}")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            data[path[0]] = value
            continue
        if len(path) != 2:
            raise RecipeError(f"override {text!r}: keys are section.key")
        section = _shorthand(path[0], data.get(path[0]))
        section = dict(section) if isinstance(section, dict) else {}
        section[path[1]] = value
        data[path[0]] = section
    for key in data:
        if key not in SECTIONS and key != "name":
            raise RecipeError(f"{key}: unknown section (known: name, {', '.join(SECTIONS)})")
    recipe = Recipe(
        name=str(data.get("name") or name or "recipe"),
        **{key: _section(key, typing.get_type_hints(Recipe)[key], data.get(key)) for key in SECTIONS},
    )
    _check(recipe)
    return recipe


class _UniqueKeys(yaml.SafeLoader):
    """YAML with a key given twice refused, instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # `<<: *anchor` merges first, as YAML says
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise RecipeError(f"line {key_node.start_mark.line + 1}: a key must be a plain value")
            if key in seen:
                raise RecipeError(f"{key}: given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a YAML recipe; its name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeys) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {path}: not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path}: not a text file (UTF-8)") from None
    except RecursionError:
        raise RecipeError(f"recipe {path}: nested too deeply to be a recipe") from None
    except RecipeError as err:
        raise RecipeError(f"recipe {path}: {err}") from None
    return from_dict(data, overrides, name=path.stem)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as written next to the adapter."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
