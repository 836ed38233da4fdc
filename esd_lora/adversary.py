"""Adversarial conditioning: new tokens whose input embeddings are learned to bring a concept back.

Textual inversion (Gal et al. 2022) used as an attack on an erasure (Pham et al. 2023, "Circumventing
Concept Erasure Methods"): the model with its erasure is frozen, and only the vectors of a few new tokens
move, by the ordinary diffusion loss on images of the concept. A soft prompt (as in UnlearnDiffAtk and
AdvUnlearn) is the same thing with the tokens put in front of a prompt that names the concept.
`esd-lora attack` audits an erasure with these; a recipe's `attack:` section trains the erasure against
them as it forms (robust erasure).

The vectors are substituted at the output of the text encoder's token-embedding layer, so the encoder's
weights never change and the pipeline samples with the tokens like with any word.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .errors import EsdLoraError
from .models import family


def check_single_encoder(pipe, what: str) -> None:
    """Learned tokens go into one text encoder; SDXL's two are not handled yet."""
    if family(pipe) == "sdxl":
        raise EsdLoraError(f"{what}: learned tokens are supported for single-text-encoder models (SD 1.x, 2.x); "
                           "SDXL is not supported yet")


class LearnedTokens:
    """New tokens in the pipeline's tokenizer whose input embeddings are the rows of `vectors`. They are named
    as diffusers names a multi-vector textual inversion (`<esd-ti>`, `<esd-ti>_1`, ...), so that the saved
    vectors (`state()`) load with `pipe.load_textual_inversion` and a prompt with `<esd-ti>` means the same."""

    def __init__(self, pipe, vectors: torch.Tensor, group: str = "adv") -> None:
        check_single_encoder(pipe, "attack")
        self.pipe = pipe
        token = f"<esd-{group}>"
        self.names = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
        pipe.tokenizer.add_tokens(self.names)
        encoder = pipe.text_encoder
        if encoder.get_input_embeddings().weight.shape[0] < len(pipe.tokenizer):
            _grow_vocabulary(encoder, len(pipe.tokenizer))
        self.ids = torch.tensor(pipe.tokenizer.convert_tokens_to_ids(self.names))
        self.vectors = torch.nn.Parameter(vectors.detach().float().clone().to(encoder.device))
        self._hook = encoder.get_input_embeddings().register_forward_hook(self._substitute)

    @property
    def text(self) -> str:
        """The tokens as they are written in a prompt: the first name, which the pipeline expands to all."""
        return self.names[0]

    @contextmanager
    def substituted(self, vectors: torch.Tensor | None):
        """Encode with other vectors in place of the learned ones for a while (None: the learned ones)."""
        learned = self.vectors
        if vectors is not None:
            self.vectors = vectors
        try:
            yield
        finally:
            self.vectors = learned

    def _substitute(self, module, args, out: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        for vector, token in zip(self.vectors, self.ids.to(ids.device)):
            out = torch.where((ids == token)[..., None], vector.to(out.dtype), out)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The vectors as a textual-inversion file's tensors: {first token name: (tokens, width)}."""
        return {self.names[0]: self.vectors.detach().float().cpu().clone()}

    def remove(self) -> None:
        """Stop substituting (the tokens stay in the tokenizer, embedded as zeros)."""
        self._hook.remove()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's hidden states for prompts, differentiable in the vectors; the same conditioning
        the pipeline computes for SD 1.x/2.x (last hidden state, no attention mask)."""
        tok, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        prompts = self.pipe.maybe_convert_prompt(prompts, tok)  # `<esd-ti>` -> `<esd-ti> <esd-ti>_1 ...`
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(encoder.device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (ids != tok.pad_token_id).long()
        return encoder(ids, attention_mask=mask)[0]


def _grow_vocabulary(encoder, size: int) -> None:
    """Rows for new tokens in the text encoder's embedding table. Under retrained concept rows
    (adapter.concept_tokens, a PEFT layer over the table) the table itself grows and the layer stays on top:
    transformers refuses to resize a PEFT layer."""
    table = encoder.get_input_embeddings()
    layer = table if isinstance(table, BaseTunerLayer) else None
    if layer is not None:
        encoder.set_input_embeddings(layer.get_base_layer())
    encoder.resize_token_embeddings(size)
    if layer is not None:
        layer.base_layer = encoder.get_input_embeddings()
        encoder.set_input_embeddings(layer)


def word_embeddings(pipe, words: list[str], what: str = "--init") -> torch.Tensor:
    """The input embeddings of words, one row each (a word of several tokens: their mean); `what` names the
    setting the words came from, for the error. Under retrained rows (adapter.concept_tokens) they are the
    base's rows (`.weight` is the table under the PEFT layer)."""
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    rows = []
    for word in words:
        ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
        known = [i for i in ids if i != pipe.tokenizer.unk_token_id]
        if not known:
            raise EsdLoraError(f"{what}: the tokenizer does not know {word!r}")
        rows.append(table[known].float().mean(0))
    return torch.stack(rows)


def random_embeddings(pipe, count: int, seed: int | str) -> torch.Tensor:
    """Rows of existing words picked at random (seeded), never an earlier learned token: a soft prompt's start
    inside the cloud of real word embeddings."""
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = sorted(i for word, i in pipe.tokenizer.get_vocab().items() if not word.startswith("<esd-") and i < len(table))
    return table[random.Random(seed).sample(ids, count)].float().clone()


@torch.no_grad()
def image_latents(pipe, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """VAE latents (the mode, scaled as the UNet sees them) of images in [-1, 1]."""
    vae = pipe.vae
    out = []
    for chunk in images.split(batch):
        x = chunk.to(vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out).float()


def denoising_loss(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The ordinary diffusion loss of the model on clean latents under a conditioning: noise at a random
    timestep, MSE of the prediction to the noise (or to v on a v-prediction model)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    dtype = next(unet.parameters()).dtype
    pred = unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
    return torch.nn.functional.mse_loss(pred.float(), target.float())


@dataclass
class TokenFit:
    """How learned tokens are fitted: Adam on the vectors only, `batch` latents per step, each with its own
    caption (one per latent, the tokens already in it: "a <esd-ti> star" for an image of a red star)."""

    captions: list[str]
    lr: float
    batch: int

    def run(self, tokens: LearnedTokens, unet, scheduler, x0: torch.Tensor, steps: int, generator: torch.Generator,
            on_step=None) -> float:
        """`steps` Adam steps on the vectors (the model's own gradients are never touched); returns the last
        loss. on_step(step) is called after each step."""
        optimizer = torch.optim.Adam([tokens.vectors], lr=self.lr)
        loss = torch.tensor(float("nan"))
        for step in range(steps):
            rows = torch.randint(0, len(x0), (self.batch,), generator=generator)
            cond = tokens.encode([self.captions[i] for i in rows])
            loss = denoising_loss(unet, scheduler, x0[rows], cond, generator)
            (grad,) = torch.autograd.grad(loss, [tokens.vectors])
            tokens.vectors.grad = grad
            optimizer.step()
            tokens.vectors.grad = None
            if on_step is not None:
                on_step(step + 1)
        return float(loss.detach())


def captions(method: str, token: str, texts: list[str]) -> list[str]:
    """Captions with the tokens: `ti` puts them in place of the concept (texts are templates with `{}`),
    `soft-prompt` in front of prompts that name it."""
    return [t.format(token) for t in texts] if method == "ti" else [f"{token} {t}" for t in texts]


class Adversary:
    """One attacker of the robust erasure (recipe section `attack`): learned tokens refitted every few training
    steps against the model being trained, and the conditioning of their prompts for the ESD loss.
    x0 are latents of the concept, texts[i] says what x0[i] shows (see `captions`); own[i] says what a latent
    sampled from the i-th trained concept prompt shows, in the same way (section.context own)."""

    def __init__(self, pipe, method: str, section, init_word: str, x0: torch.Tensor, texts: list[str],
                 seed: int, own: list[str] = ()) -> None:
        self.section, self.x0 = section, x0
        self.pipe, self.seed, self.new_words = pipe, seed, method == "soft-prompt" and section.new_words
        if method == "ti":
            self.init = word_embeddings(pipe, [section.init or init_word] * section.tokens,
                                        "attack.init" if section.init else "attack.init (default: concept.prompts[0])")
        else:
            self.init = self.words(0) if self.new_words else random_embeddings(pipe, section.tokens, seed)
        self.tokens = LearnedTokens(pipe, self.init, group=f"robust-{method}")
        self.fit = TokenFit(captions(method, self.tokens.text, texts), section.lr, section.batch)
        self.prompts = sorted(set(self.fit.captions))
        self.own = captions(method, self.tokens.text, list(own))
        self.pool: list[torch.Tensor] = []  # earlier attackers, as they were before each restart

    def words(self, restart: int) -> torch.Tensor:
        """The soft prompt's starting words at the `restart`-th start (section.new_words), from a random stream
        seeded by a string: not the draw of any integer seed of `esd-lora attack`, although on a small
        vocabulary single words can coincide with one."""
        return random_embeddings(self.pipe, self.section.tokens, f"robust start {restart} of seed {self.seed}")

    def refresh(self, unet, scheduler, generator: torch.Generator, index: int) -> None:
        """The `index`-th refit against the model as it is now (its own weights are not touched); every
        `restart_every`-th starts again from the initial tokens (new random words with section.new_words)."""
        restart = self.section.restart_every
        if restart and index and index % restart == 0:
            if self.section.pool:
                self.pool = [*self.pool, self.tokens.vectors.detach().clone()][-self.section.pool:]
            with torch.no_grad():
                self.tokens.vectors.copy_(self.words(index // restart) if self.new_words else self.init)
        self.fit.run(self.tokens, unet, scheduler, self.x0, self.section.steps, generator)

    def prompts_for(self, picks: list[int], rng: random.Random) -> list[str]:
        """The tokens' prompts for latents of the trained concept prompts `picks`: picked at random
        (section.context any) or each latent's own."""
        if self.section.context == "own":
            return [self.own[i] for i in picks]
        return [rng.choice(self.prompts) for _ in picks]

    def past(self, rng: random.Random) -> torch.Tensor | None:
        """One earlier attacker's tokens, picked at random (None while the pool is empty)."""
        return rng.choice(self.pool) if self.pool else None

    def condition(self, prompts: list[str], grad: bool = False, vectors: torch.Tensor | None = None) -> dict:
        """UNet keyword arguments of prompts with the tokens (or with earlier `vectors` from the pool);
        differentiable (`grad`) when the erasure trains the text encoder, which then learns to disarm the
        tokens too."""
        with torch.set_grad_enabled(grad), self.tokens.substituted(vectors):
            return {"encoder_hidden_states": self.tokens.encode(prompts)}

    def state(self) -> dict[str, torch.Tensor]:
        """The tokens, and the pool's (as `<name>.pool`, one row of tokens per earlier attacker) when it has any."""
        state = self.tokens.state()
        if self.pool:
            state[self.tokens.names[0] + ".pool"] = torch.stack(self.pool).cpu()
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        name = self.tokens.names[0]
        with torch.no_grad():
            self.tokens.vectors.copy_(state[name])
        device = self.tokens.vectors.device
        self.pool = list(state[name + ".pool"].to(device).unbind()) if name + ".pool" in state else []
