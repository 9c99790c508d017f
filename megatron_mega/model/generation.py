"""Autoregressive generation for MegaForCausalLM, with transformers' argument names and semantics.

Greedy or sampled (temperature, top-k, top-p) decoding, batched with left padding, stopping at eos, with
transformers' repetition penalty, n-gram blocking, minimum lengths and several samples per prompt; defaults come from
`model.generation_config` (model/generation_config.py). Beam search is not implemented, and an argument this does not
implement is refused by name rather than ignored. With the cache each new token costs one step through the EMA
recurrence and attention over the current chunk only.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch

from megatron_mega.model.cache import MegaStaticCache, static_cache_size
from megatron_mega.model.decode_graph import CudaGraphStep
from megatron_mega.model.generation_config import GENERATION_CONFIG_NAME, HARMLESS_DEFAULTS, GenerationConfig
from megatron_mega.model.outputs import GenerateDecoderOnlyOutput

logger = logging.getLogger(__name__)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly ahead of each token
    remove_sorted = before >= top_p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


class _Unset:
    def __repr__(self) -> str:
        return "<not given>"


UNSET = _Unset()  # an argument not given (None given explicitly is applied, as in transformers)

# MegaConfig generation fields transformers would apply and this generate() does not: a warning when one is away
# from its default (HARMLESS_DEFAULTS)
_IGNORED_SETTINGS = ("num_beam_groups", "diversity_penalty", "typical_p", "length_penalty", "bad_words_ids",
                     "forced_bos_token_id", "forced_eos_token_id", "encoder_no_repeat_ngram_size",
                     "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
                     "remove_invalid_values")


def _apply_repetition_penalty(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: every token already in the row (prompt included) has its
    score divided by the penalty when positive, multiplied when negative."""
    seen = scores.gather(1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def _ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, size: int) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor: a token that would complete an n-gram already in the row is
    banned."""
    length = sequences.shape[1]
    if length + 1 < size:
        return scores
    rows = sequences.tolist()
    for row, tokens in enumerate(rows):
        prefix = tuple(tokens[length - size + 1:]) if size > 1 else ()
        banned = [tokens[i + size - 1] for i in range(length - size + 1) if tuple(tokens[i:i + size - 1]) == prefix]
        if banned:
            scores[row, banned] = float("-inf")
    return scores


def _eos_ids(value: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An id, a list of ids, a numpy integer or a tensor, as a 1-d tensor (empty for None)."""
    if value is None:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.as_tensor(value).reshape(-1).to(device=device, dtype=dtype)


def _new_token_budget(prompt_length: int, max_length: Optional[int], generation: GenerationConfig) -> int:
    """transformers' rules: max_new_tokens (given, or the generation config's) wins; else max_length (given, or a
    configured one) counts the prompt; with neither and the generation config's max_length at its default (20),
    20 new tokens (transformers >= 4.39)."""
    max_new_tokens = generation.max_new_tokens
    if max_new_tokens is None and max_length is None:
        if generation.max_length == GenerationConfig().max_length:
            max_new_tokens = generation.max_length
        else:
            max_length = generation.max_length
    if max_new_tokens is not None:
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be greater than 0, got {max_new_tokens}")
        return int(max_new_tokens)
    if max_length <= prompt_length:
        raise ValueError(f"the input is {prompt_length} tokens long, but max_length is {max_length}: raise "
                         f"max_length or pass max_new_tokens")
    return int(max_length) - prompt_length


# transformers' "generation parameters" of a model config (PretrainedConfig._get_global_generation_defaults); token
# ids are not among them
_CONFIG_GENERATION_PARAMETERS = ("max_length", "min_length", "do_sample", "num_beams",
                                 "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size",
                                 "num_return_sequences", "output_scores", "return_dict_in_generate")


def _edited_generation_parameters(config, generation: GenerationConfig) -> bool:
    return any(getattr(config, name, None) != generation.origin.get(name) for name in _CONFIG_GENERATION_PARAMETERS)


class MegaGenerationMixin:
    @property
    def generation_config(self) -> GenerationConfig:
        """The defaults of generate(): made from the config's generation fields when the model is built (a
        snapshot, as in transformers), or read from a generation_config.json by from_pretrained."""
        existing = self.__dict__.get("_generation_config")
        if existing is None:
            existing = GenerationConfig.from_model_config(self.config)
            self.__dict__["_generation_config"] = existing
        return existing

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        generation = GenerationConfig.coerce(value)  # ours, transformers' or a mapping, as a copy
        generation.origin = None  # set apart from this model's config: saved beside it
        self.__dict__["_generation_config"] = generation

    def _read_generation_config(self, directory: str) -> None:
        """from_pretrained: a generation_config.json beside config.json replaces the config's generation fields
        (not through the setter: one made from config.json stays "unedited")."""
        self.__dict__["_generation_config"] = GenerationConfig.from_pretrained(
            directory, base=GenerationConfig.from_model_config(self.config))

    def _write_generation_config(self, directory: str) -> None:
        """save_pretrained: the generation config when it was set or edited apart from config.json; else no file
        (and none left from an earlier save)."""
        generation = self.generation_config
        if not generation.follows_model_config:
            generation.save_pretrained(directory)
        elif os.path.exists(os.path.join(directory, GENERATION_CONFIG_NAME)):
            os.remove(os.path.join(directory, GENERATION_CONFIG_NAME))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: Any = UNSET,
        max_length: Optional[int] = None,
        do_sample: Any = UNSET,
        temperature: Any = UNSET,
        top_k: Any = UNSET,
        top_p: Any = UNSET,
        use_cache: bool = True,
        eos_token_id: Any = UNSET,
        pad_token_id: Any = UNSET,
        generator: Optional[torch.Generator] = None,
        num_beams: Any = UNSET,
        cache_implementation: str = "dynamic",
        cuda_graph: bool = False,
        *,
        inputs: Optional[torch.Tensor] = None,
        generation_config: Optional[GenerationConfig] = None,
        **settings: Any,
    ) -> Union[torch.Tensor, GenerateDecoderOnlyOutput]:
        """Returns (batch x num_return_sequences, prompt + new tokens); rows that hit eos are filled with
        pad_token_id afterwards. With return_dict_in_generate, a GenerateDecoderOnlyOutput (sequences, and scores /
        logits per step when output_scores / output_logits). Other keywords: any GenerationConfig field
        (min_new_tokens, min_length, repetition_penalty, no_repeat_ngram_size, num_return_sequences, ...); anything
        else is refused by name.

        `cache_implementation="static"` decodes on fixed-size buffers (model/cache.py `MegaStaticCache`), the same
        tokens; with it `cuda_graph=True` (a model on a CUDA device) replays every step as one CUDA graph
        (model/decode_graph.py) instead of launching its kernels one by one, captured for this call after two
        warm-up steps (for 3 steps or fewer the steps run eagerly)."""
        config = self.config
        if inputs is not None:
            if input_ids is not None:
                raise ValueError("give the prompt as input_ids or inputs, not both")
            input_ids = inputs
        if input_ids is None:
            raise ValueError("generate() needs input_ids (the prompt)")
        own = self.generation_config
        if generation_config is None:
            # transformers' legacy rule: an unedited generation config made from the config follows later edits of
            # the config's generation parameters (ids alone do not count)
            if own.follows_model_config and _edited_generation_parameters(config, own):
                own = GenerationConfig.from_model_config(config)
            chosen = own
        else:  # transformers: a passed config's fields left at their defaults take the model's values (on a copy)
            chosen = GenerationConfig.coerce(generation_config)
            default = GenerationConfig()
            for name in GenerationConfig.field_names():
                value = getattr(chosen, name)
                if value is None or value == getattr(default, name):
                    setattr(chosen, name, getattr(own, name))
        refused = chosen.unsupported()
        if refused:
            raise ValueError(f"generate(): the generation config asks for {refused}, which is not implemented here "
                             f"(no beam search variants, constraints, token suppression or assisted decoding)")
        fields = GenerationConfig.field_names()
        generation = GenerationConfig(**{k: v for k, v in chosen.to_dict().items() if k in fields})
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise ValueError(f"generate(): {unknown} not supported here (no beam search, logits processors or "
                             f"stopping criteria); supported settings: {sorted(fields)}")
        # an argument given as None is applied (transformers: eos_token_id=None turns eos off, top_k=None top-k)
        explicit = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_beams=num_beams,
                        max_new_tokens=max_new_tokens, **settings)
        generation.update({k: v for k, v in explicit.items() if v is not UNSET})
        do_sample = bool(generation.do_sample)
        temperature = 1.0 if generation.temperature is None else generation.temperature
        if do_sample and temperature == 0.0:  # transformers: sampling at temperature 0 is greedy decoding
            do_sample, temperature = False, 1.0
        penalty = 1.0 if generation.repetition_penalty is None else generation.repetition_penalty
        ngram = generation.no_repeat_ngram_size or 0
        ignored = [name for name in _IGNORED_SETTINGS
                   if getattr(config, name, HARMLESS_DEFAULTS[name]) != HARMLESS_DEFAULTS[name]]
        if ignored:
            logger.warning("generate() does not apply the config's %s", ", ".join(ignored))
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
        static = use_cache and cache_implementation == "static"
        if cuda_graph and not static:
            raise ValueError("cuda_graph=True needs cache_implementation='static' (and use_cache=True)")
        if cuda_graph and input_ids.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {input_ids.device}")
        if not config.is_decoder:
            raise ValueError("generate() needs a decoder: is_decoder=True and bidirectional=False")
        if generation.num_beams not in (None, 1):
            raise ValueError(f"beam search is not implemented (num_beams={generation.num_beams}); use num_beams=1 "
                             f"(greedy or sampling)")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        copies = int(generation.num_return_sequences or 1)
        if copies < 1 or (copies > 1 and not do_sample):
            raise ValueError(f"num_return_sequences={copies}: more than one needs do_sample=True (greedy decoding "
                             f"gives the same sequence each time; beam search is not implemented)")
        prompt_length = input_ids.shape[1]
        new_tokens = _new_token_budget(prompt_length, max_length, generation)
        # transformers: min_new_tokens, when set, replaces min_length (which counts the prompt)
        min_new = (generation.min_new_tokens if generation.min_new_tokens is not None
                   else max(0, (generation.min_length or 0) - prompt_length))
        eos = _eos_ids(generation.eos_token_id, input_ids.device, input_ids.dtype)
        pad_token_id = generation.pad_token_id
        if pad_token_id is None:  # transformers pads finished rows with the first eos id then
            pad_token_id = int(eos[0]) if eos.numel() else (config.pad_token_id or 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif bool((attention_mask[:, -1] == 0).any()):
            logger.warning("right padding detected in a decoder prompt: pad on the left for correct generation")
        if copies > 1:
            input_ids = input_ids.repeat_interleave(copies, dim=0)
            attention_mask = attention_mask.repeat_interleave(copies, dim=0)
        # what generate reads from a forward is fixed, whatever the config says the model returns by default
        quiet = dict(return_dict=True, output_attentions=False, output_hidden_states=False)

        was_training = self.training
        self.eval()
        scores: list[torch.Tensor] = []
        raw: list[torch.Tensor] = []
        try:
            sequences = input_ids
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            out = self(input_ids, attention_mask=attention_mask, use_cache=use_cache, logits_to_keep=1, **quiet)
            cache = out.past_key_values if use_cache else None
            graph = None
            if static:
                cache = MegaStaticCache.from_cache(cache, static_cache_size(config, prompt_length + new_tokens))
                if cuda_graph and new_tokens - 1 > 3:  # the steps after the prefill's token, past the warm-up
                    graph = CudaGraphStep(self, cache, input_ids.shape[0])
            for step in range(new_tokens):
                # a copy: .float() of float32 logits is the forward's own tensor (a CUDA graph's output buffer,
                # overwritten by the next replay), and the processors below must not write into it
                logits = out.logits[:, -1, :].float().clone()
                if generation.output_logits:
                    raw.append(logits.clone())
                if penalty != 1.0:
                    logits = _apply_repetition_penalty(logits, sequences, penalty)
                if ngram > 0:
                    logits = _ban_repeated_ngrams(logits, sequences, ngram)
                if step < min_new and eos.numel():
                    logits = logits.index_fill(-1, eos, float("-inf"))
                if do_sample:
                    logits = logits / temperature
                    if generation.top_k and generation.top_k > 0:
                        logits = _top_k_filter(logits, generation.top_k)
                    if generation.top_p is not None and generation.top_p < 1.0:
                        logits = _top_p_filter(logits, generation.top_p)
                    next_tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
                else:
                    next_tokens = logits.argmax(dim=-1)
                if generation.output_scores:
                    scores.append(logits)
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
                sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
                if eos.numel():
                    finished = finished | torch.isin(next_tokens, eos)
                if bool(finished.all()) or step == new_tokens - 1:
                    break
                if graph is not None:
                    out.logits = graph.step(next_tokens[:, None])
                elif static:
                    # the new tokens are real (a finished row's pad is fed as a token, as with the dynamic cache):
                    # no mask, so that the step reads nothing back to the host
                    out = self(next_tokens[:, None], past_key_values=cache, use_cache=True, **quiet)
                elif use_cache:
                    out = self(next_tokens[:, None], attention_mask=attention_mask, past_key_values=cache,
                               use_cache=True, **quiet)
                    cache = out.past_key_values
                else:
                    out = self(sequences, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **quiet)
            if generation.return_dict_in_generate:
                return GenerateDecoderOnlyOutput(sequences=sequences,
                                                 scores=tuple(scores) if generation.output_scores else None,
                                                 logits=tuple(raw) if generation.output_logits else None)
            return sequences
        finally:
            self.train(was_training)
