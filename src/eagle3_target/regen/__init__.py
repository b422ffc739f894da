"""Regeneration: the target writes the assistant turns it will be trained to draft.

``run_regenerate(RegenConfig(...))`` (``eagle3-target regenerate``) answers chat data
with the target (transformers, SGLang's offline ``Engine``, or any OpenAI-compatible
chat server) and writes OpenAI ``messages`` rows that ``vocab`` and ``dump`` read.
Modules: :mod:`.config` (settings, the per-row seed), :mod:`.prompts` (rows ->
prompts -> rows), :mod:`.job` (the resumable job), :mod:`.output` (shards, manifest),
:mod:`.summary`, and one module per engine (:mod:`.hf`, :mod:`.sglang`, :mod:`.server`).
"""

from eagle3_target.regen.config import RegenConfig, row_seed
from eagle3_target.regen.job import run_regenerate
from eagle3_target.regen.output import read_shard
from eagle3_target.regen.summary import RegenSummary

__all__ = ["RegenConfig", "RegenSummary", "run_regenerate", "read_shard", "row_seed"]
