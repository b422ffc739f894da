#!/usr/bin/env python3
"""Writes the sample chat data shipped with eagle3-target (deterministic: same bytes
every run, nothing downloaded).

    python scripts/make_sample_chats.py            # rewrites src/eagle3_target/data/sample_*.jsonl
    python scripts/make_sample_chats.py --check    # exits 1 if the committed files differ

``sample_chats.jsonl`` holds OpenAI-style ``messages`` rows (system prompts, multi-turn
chats, reasoning inline as ``<think>...</think>`` and as ``reasoning_content``);
``sample_sharegpt.jsonl`` holds ShareGPT-style ``conversations`` (``human``/``gpt``/
``system``). The text was written for this project: short questions and answers about
speculative decoding, the target model, data and code, composed by a seeded generator.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "eagle3_target" / "data"
N_OPENAI = 300
N_SHAREGPT = 60
SEED = 20240605

SYSTEM_PROMPTS = [
    "You are a concise assistant.",
    "You are a helpful assistant for machine learning engineers.",
    "Answer in one or two sentences.",
    "You explain systems topics clearly and without jargon.",
    "You are a careful code reviewer.",
    "Be precise. If you are unsure, say so.",
]

# (question, answer) pairs about the project's domain.
QA = [
    ("What does a draft model do in speculative decoding?",
     "It proposes the next few tokens cheaply; the target model checks them in one forward pass and keeps the ones it agrees with."),
    ("Why does EAGLE-3 use three hidden layers of the target?",
     "A low, a middle and a high layer give the draft both surface and semantic features, which predicts the next tokens better than the last layer alone."),
    ("What is the acceptance rate?",
     "It is the share of drafted tokens that the target accepts. Higher acceptance means more tokens per target forward and a faster decode."),
    ("Why are the logits shifted left by one?",
     "The draft at position i predicts the token after the next one, so its target is the distribution the model gives at position i plus one."),
    ("What is a loss mask?",
     "A vector of zeros and ones over the tokens; only positions with a one contribute to the training loss, usually the assistant's answer."),
    ("Why not train on the user's tokens too?",
     "At inference time the draft only has to predict what the assistant writes, so training on prompts spends capacity on text it never drafts."),
    ("What is a draft vocabulary?",
     "A smaller set of target tokens, chosen by frequency, that the draft head predicts. It makes the draft's output layer much cheaper."),
    ("How is the draft vocabulary chosen?",
     "Count the supervised tokens in the training data, keep the special tokens first, then take the most frequent ones until the size is reached."),
    ("What are d2t and t2d?",
     "d2t maps a draft id to its target id as an offset; t2d marks which target ids are in the draft vocabulary."),
    ("Why store supervision on disk?",
     "When you train several drafts on the same data, running the target once and reading the results back is cheaper than running it every epoch."),
    ("How big is the supervision for one token of an 8B model?",
     "The three aux layers take about 24 kilobytes in bf16; full logits add about 250 kilobytes, which is why compact forms matter."),
    ("What is the hidden mode of the dump?",
     "It stores the final hidden state instead of the logits; the trainer rebuilds the logits with the LM head on its own GPU."),
    ("Why write shards under a temporary name?",
     "A shard renamed only when it is complete and hashed can never be seen half written, even if the job is killed."),
    ("What does resumable mean for a dump?",
     "Running the same command again after a crash continues where it stopped, without losing or repeating samples."),
    ("Why check a sha256 for every shard?",
     "It catches silent corruption: a flipped byte on disk shows up as a hash mismatch instead of a bad training run."),
    ("What is safetensors?",
     "A simple file format for tensors: a JSON header and raw bytes. It can be memory mapped and never runs code when loaded."),
    ("Why avoid pickle files?",
     "Loading a pickle can run arbitrary code, so a file from an untrusted source could take over the machine."),
    ("What does memory mapping give a data loader?",
     "The operating system pages in only the bytes a sample needs, so a large dataset opens instantly and uses little memory."),
    ("How do I split a dump across machines?",
     "Give each worker the same command with its own shard index and the total number of shards; the rows never overlap."),
    ("What is right padding?",
     "Shorter rows get pad tokens at the end, and the attention mask marks them as zero so they never affect real positions."),
    ("Why is the GPU faster than the CPU here?",
     "The forward pass is mostly large matrix multiplications, which a GPU runs with far more parallel arithmetic and memory bandwidth."),
    ("What is bf16?",
     "A 16-bit float with the same exponent range as fp32 but fewer mantissa bits. It halves memory and is the usual dtype for LLM inference."),
    ("How do I read a JSONL file in Python?",
     "Open it and call json.loads on each non-empty line; each line is one JSON object."),
    ("Write a function that adds two numbers.",
     "def add(a, b):\n    return a + b"),
    ("Write a function that reverses a list.",
     "def reverse(items):\n    return items[::-1]"),
    ("How do I count words in a string?",
     "Split it on whitespace and take the length: len(text.split())."),
    ("Write a function that returns the largest value in a list.",
     "def largest(values):\n    if not values:\n        raise ValueError('empty list')\n    return max(values)"),
    ("How do I check that a file exists?",
     "Use pathlib: Path(name).is_file() returns True for an existing regular file."),
    ("What does an attention mask do?",
     "It tells the attention layers which positions are real tokens and which are padding to ignore."),
    ("What is a tokenizer?",
     "It turns text into integer token ids the model understands, and back again."),
    ("What is a chat template?",
     "A small Jinja program shipped with the tokenizer that turns a list of messages into the exact text the model was trained on."),
    ("Why do chat templates matter for training?",
     "If the training text is rendered differently from what the model sees at inference, the draft learns the wrong patterns."),
    ("What is a generation marker in a template?",
     "A block around the assistant's text that lets the tokenizer return a mask of exactly the tokens the model generates."),
    ("What happens if a conversation is longer than the maximum length?",
     "It is cut at the limit; if the cut removes every assistant token, the sample has nothing to learn from and is reported."),
    ("What is a reasoning block?",
     "Text between think tags where a model works through a problem before it answers; some recipes leave it out of the loss."),
    ("How do I make a job deterministic?",
     "Fix the order of the data, the seeds and the batch composition, and avoid depending on timing or thread scheduling."),
    ("Why is the final norm applied before the LM head?",
     "The model was trained that way: the last hidden state is normalised, then projected to the vocabulary to give the logits."),
    ("What is a KV cache?",
     "Stored keys and values of earlier tokens, so each new token attends to the past without recomputing it."),
    ("Why is decoding memory bound?",
     "Each step reads all the weights to produce one token per sequence, so the time goes into moving memory rather than arithmetic."),
    ("How does speculative decoding keep the output distribution?",
     "The target verifies every drafted token with a rejection rule, so the accepted text follows the target's own distribution."),
    ("What is a good draft length?",
     "It depends on the acceptance rate; three to six tokens is common, and tree drafting can try several branches at once."),
    ("What is throughput?",
     "The amount of work done per second, here tokens per second or megabytes written per second."),
    ("How do I compare two files byte for byte?",
     "Read both and compare the bytes, or compare their sha256 hashes; cmp on the command line does the same."),
    ("What is an atomic rename?",
     "On one filesystem, renaming a file replaces the target in a single step, so readers see the old file or the new one, never a mix."),
    ("Why fsync before renaming?",
     "It forces the data to disk first, so after a power loss the renamed file is never a name pointing at missing bytes."),
    ("Can I train a draft for a model I serve with SGLang?",
     "Yes: generate the supervision with the same model and chat template you serve, then train the draft on it."),
    ("What is a manifest?",
     "A small JSON file describing the dataset: its configuration, its shards with their hashes, and counts of samples and tokens."),
    ("How do I test resumability?",
     "Kill the job at random moments, rerun it, and check that the result is identical to a run that was never interrupted."),
]

FOLLOW_UPS = [
    ("Can you say that more briefly?", "In short: {short}"),
    ("Why does that matter?", "Because it decides {why}."),
    ("Give me an example.", "For example, {example}"),
    ("Thanks!", "You are welcome."),
    ("Is that always true?", "Mostly. There are exceptions, so measure on your own data before you rely on it."),
]
WHY = ["how fast the draft is", "how much disk the dataset needs", "whether training sees the right targets",
       "how often the target accepts a draft", "whether a crash costs a rerun"]
EXAMPLES = ["a chat with one question and one answer has only the answer under the loss mask.",
            "an 8B model with a 32k draft vocabulary stores far less than its full 128k logits.",
            "killing the job after three shards and rerunning it writes shard four next.",
            "the tokens of the role header stay out of the loss.",
            "a shard of 256 megabytes holds a few thousand short chats."]
THOUGHTS = ["The user asks about {topic}. I should answer directly and keep it short.",
            "Let me recall what {topic} means and give the key point first.",
            "This is a definition question about {topic}; one or two sentences are enough.",
            "I need to explain {topic} without jargon."]


def _short(answer: str) -> str:
    first = answer.split(". ")[0].rstrip(".")
    return first[0].lower() + first[1:] + "." if first else answer


def _topic(question: str) -> str:
    return question.rstrip("?.!").split(" ", 2)[-1].lower()


def openai_row(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    q, a = rng.choice(QA)
    turns = rng.choices([1, 2, 3], weights=[55, 30, 15])[0]
    style = rng.random()
    first_answer: dict = {"role": "assistant", "content": a}
    if style < 0.15:
        thought = rng.choice(THOUGHTS).format(topic=_topic(q))
        first_answer["content"] = f"<think>\n{thought}\n</think>\n\n{a}"
    elif style < 0.25:
        first_answer["reasoning_content"] = rng.choice(THOUGHTS).format(topic=_topic(q))
    messages += [{"role": "user", "content": q}, first_answer]
    for _ in range(turns - 1):
        fq, fa = rng.choice(FOLLOW_UPS)
        fa = fa.format(short=_short(a), why=rng.choice(WHY), example=rng.choice(EXAMPLES))
        messages += [{"role": "user", "content": fq}, {"role": "assistant", "content": fa}]
    return {"messages": messages}


def sharegpt_row(rng: random.Random) -> dict:
    conv = []
    if rng.random() < 0.3:
        conv.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
    q, a = rng.choice(QA)
    conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    if rng.random() < 0.4:
        fq, fa = rng.choice(FOLLOW_UPS)
        fa = fa.format(short=_short(a), why=rng.choice(WHY), example=rng.choice(EXAMPLES))
        conv += [{"from": "human", "value": fq}, {"from": "gpt", "value": fa}]
    return {"conversations": conv}


def render() -> dict[str, bytes]:
    rng = random.Random(SEED)
    files = {}
    for name, n, make in (("sample_chats.jsonl", N_OPENAI, openai_row),
                          ("sample_sharegpt.jsonl", N_SHAREGPT, sharegpt_row)):
        lines = [json.dumps(dict(make(rng), id=f"{name.split('.')[0]}-{i:04d}"), ensure_ascii=False)
                 for i in range(n)]
        files[name] = ("\n".join(lines) + "\n").encode()
    return files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the committed files instead")
    args = p.parse_args()
    stale = []
    for name, data in render().items():
        path = OUT_DIR / name
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(name)
        else:
            path.write_bytes(data)
            print(f"wrote {path} ({data.count(10)} rows, {len(data)} bytes)")
    if stale:
        print(f"stale: {', '.join(stale)} (run scripts/make_sample_chats.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
