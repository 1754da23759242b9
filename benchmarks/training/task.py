"""The task, the tokenizer and the policy of the training benchmark, built in memory.

Task ("stride"): the prompt is two digits, a start s and a step k; the answer is the
sequence s + k, s + 2k, s + 3k, ... (mod 10), one digit per token, `length` tokens long.
The reward of a completion is the fraction of its `length` positions whose digit is the
previous digit plus k (mod 10), with s before the first: a local check, so that one wrong
digit costs one position rather than the rest of the answer.

Why this task: the reward is computed by code and graded per position, so it rises smoothly
from chance (1/10) as the policy learns, and a 2-layer model from random initialisation learns
it in a few hundred GRPO steps on a CPU. The answer is long (64 tokens by default) and the
reward is one number per sequence, so every token's update rides on a sequence-level
advantage: the setting in which per-token importance ratios are noisy and the filter matters.
The step k must be read from the prompt (or inferred from the answer so far), which keeps the
task from being a bigram table.
"""

import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DIGITS = [str(d) for d in range(10)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = SPECIAL + DIGITS


def tokenizer():
    """A word-level tokenizer over the ten digits (tokens separated by spaces)."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def special_token_ids():
    """Token ids that generation never samples: every completion is `length` digits."""
    return [VOCAB.index(token) for token in SPECIAL]


def policy(seed, *, hidden=64, layers=2, heads=4, max_positions=128):
    """A randomly initialised small Llama (about 0.1M parameters at the defaults)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=VOCAB.index("<pad>"),
        bos_token_id=VOCAB.index("<s>"),
        eos_token_id=VOCAB.index("</s>"),
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def prompts(count, *, steps=(1, 2, 3), seed=0):
    """`count` prompts "s k", s uniform over the digits and k over `steps`."""
    rng = random.Random(seed)
    return Dataset.from_dict({"prompt": [f"{rng.randrange(10)} {rng.choice(steps)}" for _ in range(count)]})


def stride_reward(length):
    """The reward function (TRL's signature): fraction of the `length` positions that continue
    the stride; a missing position (a short completion) counts as wrong."""

    def reward(prompts, completions, **kwargs):
        scores = []
        for prompt, completion in zip(prompts, completions):
            start, step = (int(word) for word in prompt.split())
            previous, correct = start, 0
            for word in completion.split()[:length]:
                digit = int(word) if word in DIGITS else None
                correct += digit == (previous + step) % 10
                previous = digit if digit is not None else previous
            scores.append(correct / length)
        return scores

    reward.__name__ = "stride"
    return reward
