"""The six task heads, with transformers' class names, submodule names and label conventions."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mega.model.config import MegaConfig
from megatron_mega.model.generation import MegaGenerationMixin
from megatron_mega.model.lm_loss import LMHeadTransform, lm_head_loss
from megatron_mega.model.mega_model import MegaModel
from megatron_mega.model.outputs import (
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from megatron_mega.model.pretrained import MegaPreTrainedModel

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def _encode(head: MegaPreTrainedModel, input_ids, attention_mask, token_type_ids, inputs_embeds,
            output_attentions, output_hidden_states):
    """The base model's forward as every non-generating head calls it."""
    return head.mega(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     inputs_embeds=inputs_embeds, use_cache=False, output_attentions=output_attentions,
                     output_hidden_states=output_hidden_states, return_dict=True)


def _as_tuple(loss, head_outputs: tuple, base_outputs) -> tuple:
    """transformers' MEGA return_dict=False layout, position for position (code indexing `outputs[2]` ports
    unchanged): (loss if any, head outputs..., hidden_states, past_key_values, attentions, cross_attentions),
    Nones kept, as its heads build it from MegaModel's tuple (`(logits,) + outputs[2:]`)."""
    rest = (base_outputs.hidden_states, base_outputs.past_key_values, base_outputs.attentions,
            base_outputs.cross_attentions)
    out = head_outputs + rest
    return (loss,) + out if loss is not None else out


class _LMHeadModel(MegaPreTrainedModel, LMHeadTransform):
    """Shared by the causal and masked LM: optional dense+tanh, then a projection tied to the embeddings."""

    _head_name = ""

    def __init__(self, config: MegaConfig):
        super().__init__(config)
        self.mega = MegaModel(config, add_pooling_layer=False)
        self.init_lm_transform(config)
        setattr(self, self._head_name, nn.Linear(config.hidden_size, config.vocab_size))
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return getattr(self, self._head_name)

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        setattr(self, self._head_name, new_embeddings)

    def lm_logits(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.get_output_embeddings()(self.transform(sequence_output))

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the positions with a label, without materialising (tokens x vocab) logits."""
        head = self.get_output_embeddings()
        return lm_head_loss(hidden, labels, self.transform, head.weight, head.bias, IGNORE_INDEX)

    def logits_later(self, output, hidden: torch.Tensor) -> None:
        """With labels the loss does not need the logits: compute them only if `output.logits` is read. Reading
        them after the head's weights changed (an optimizer step) would give other numbers, so it is refused."""
        params = [p for p in (*self.get_output_embeddings().parameters(),
                              *(self.dense.parameters() if self.dense is not None else ())) if p is not None]
        versions = [p._version for p in params]

        def compute() -> torch.Tensor:
            if [p._version for p in params] != versions:
                raise RuntimeError("logits of a forward with labels are computed when first read, and the LM head's "
                                   "weights changed since that forward (an optimizer step?): read out.logits "
                                   "before updating the weights")
            return self.lm_logits(hidden)

        output.set_lazy("logits", compute)


class MegaForCausalLM(_LMHeadModel, MegaGenerationMixin):
    """Next-token prediction. `labels` are the input ids themselves: the shift happens inside."""

    _head_name = "lm_head"
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: MegaConfig):
        if not config.is_decoder:
            logger.warning("MegaForCausalLM without is_decoder=True attends to future tokens; "
                           "set is_decoder=True and bidirectional=False for language modelling")
        super().__init__(config)
        _ = self.generation_config  # made now, from the config as it is (a snapshot, as in transformers)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        past_key_values=None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
    ):
        """`logits_to_keep=k > 0` computes the logits of the last k positions only (transformers' argument):
        a prefill for generation needs one row, not (tokens x vocab)."""
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if labels is not None:
            use_cache = False
        outputs = self.mega(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask, past_key_values=past_key_values,
                            use_cache=use_cache, output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states, return_dict=True)
        hidden = outputs.last_hidden_state
        result = CausalLMOutputWithCrossAttentions(past_key_values=outputs.past_key_values,
                                                   hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        if labels is None:
            result.logits = self.lm_logits(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)
        else:
            # position t predicts token t+1; -100 marks positions without a target
            result.loss = self.lm_loss(hidden[:, :-1], labels[:, 1:])
            self.logits_later(result, hidden)
        if not return_dict:
            return _as_tuple(result.loss, (result.logits,), outputs)
        return result


class MegaForMaskedLM(_LMHeadModel):
    """Masked-token prediction; labels are not shifted, -100 everywhere except the masked positions."""

    _head_name = "mlm_head"
    _tied_weights_keys = ["mlm_head.weight"]

    def __init__(self, config: MegaConfig):
        if config.is_decoder:
            logger.warning("MegaForMaskedLM with is_decoder=True cannot see the right context; "
                           "set is_decoder=False for bidirectional attention")
        super().__init__(config)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise ValueError("MEGA cross-attention is not supported: encoder_hidden_states must be None")
        outputs = _encode(self, input_ids, attention_mask, token_type_ids, inputs_embeds, output_attentions,
                          output_hidden_states)
        hidden = outputs.last_hidden_state
        result = MaskedLMOutput(hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        if labels is None:
            result.logits = self.lm_logits(hidden)
        else:
            result.loss = self.lm_loss(hidden, labels)
            self.logits_later(result, hidden)
        if not return_dict:
            return _as_tuple(result.loss, (result.logits,), outputs)
        return result


def _classifier_dropout(config: MegaConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


class MegaClassificationHead(nn.Module):
    """RoBERTa-style: dropout, dense, tanh, dropout, projection, on the first token."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features[:, 0, :])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


def sequence_classification_loss(config: MegaConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' rule: problem_type decides MSE, cross-entropy or BCE; it is inferred once if unset."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().to(torch.float32))
        return F.mse_loss(logits.float(), labels.float())
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels).float(), labels.view(-1), ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class MegaForSequenceClassification(MegaPreTrainedModel):
    def __init__(self, config: MegaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mega = MegaModel(config, add_pooling_layer=False)
        self.classifier = MegaClassificationHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        outputs = _encode(self, input_ids, attention_mask, token_type_ids, inputs_embeds, output_attentions,
                          output_hidden_states)
        logits = self.classifier(outputs.last_hidden_state)
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        if not return_dict:
            return _as_tuple(loss, (logits,), outputs)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


class MegaForMultipleChoice(MegaPreTrainedModel):
    """Inputs (batch, choices, seq); one score per choice from the pooled first token."""

    def __init__(self, config: MegaConfig):
        super().__init__(config)
        self.mega = MegaModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, token_type_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]

        def flat(t: Optional[torch.Tensor], keep: int = 1) -> Optional[torch.Tensor]:
            return None if t is None else t.reshape(-1, *t.shape[-keep:])

        outputs = self.mega(flat(input_ids), token_type_ids=flat(token_type_ids),
                            attention_mask=flat(attention_mask), inputs_embeds=flat(inputs_embeds, 2),
                            use_cache=False, output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, num_choices)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        if not return_dict:
            return _as_tuple(loss, (logits,), outputs)
        return MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions)


class MegaForTokenClassification(MegaPreTrainedModel):
    def __init__(self, config: MegaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mega = MegaModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        outputs = _encode(self, input_ids, attention_mask, token_type_ids, inputs_embeds, output_attentions,
                          output_hidden_states)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1),
                                   ignore_index=IGNORE_INDEX)
        if not return_dict:
            return _as_tuple(loss, (logits,), outputs)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class MegaForQuestionAnswering(MegaPreTrainedModel):
    """Span extraction: start and end logits per token. Positions outside the sequence are ignored."""

    def __init__(self, config: MegaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mega = MegaModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if self.num_labels != 2:
            raise ValueError(f"MegaForQuestionAnswering needs num_labels=2 (start, end), got {self.num_labels}")
        outputs = _encode(self, input_ids, attention_mask, token_type_ids, inputs_embeds, output_attentions,
                          output_hidden_states)
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            start_positions = start_positions.reshape(-1)
            end_positions = end_positions.reshape(-1)
            # positions outside the sequence (truncated answers) are clamped to seq_len and ignored
            ignored = start_logits.shape[1]
            start_positions = start_positions.clamp(0, ignored)
            end_positions = end_positions.clamp(0, ignored)
            loss = (F.cross_entropy(start_logits.float(), start_positions, ignore_index=ignored)
                    + F.cross_entropy(end_logits.float(), end_positions, ignore_index=ignored)) / 2
        if not return_dict:
            return _as_tuple(loss, (start_logits, end_logits), outputs)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states, attentions=outputs.attentions)


MEGA_HEADS = {
    "causal-lm": MegaForCausalLM,
    "masked-lm": MegaForMaskedLM,
    "sequence-classification": MegaForSequenceClassification,
    "multiple-choice": MegaForMultipleChoice,
    "token-classification": MegaForTokenClassification,
    "question-answering": MegaForQuestionAnswering,
}
