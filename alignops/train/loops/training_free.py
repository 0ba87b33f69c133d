"""Training-free GRPO (docs/methods.md §2.32): no parameter update; an experience library in the
policy's prompt, edited by an LLM from groups of rollouts with mixed rewards.

A step: rollouts with the library in the prompt -> keep groups whose rewards differ -> summarise
each trajectory -> semantic advantage (experiences per question) -> per-question operations
ADD / UPDATE / DELETE / NONE -> one batch-merge call -> deterministic conflict resolution -> apply,
bound, save library.json. The operations are pure functions below; the LLM is llm.py's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import warnings

from alignops.train.evaluate import evaluate as greedy_accuracy
from alignops.train.loops.base import DataLoop
from alignops.train.loops.llm import (PAYLOAD_MARKER, ChatCompletionsClient, LLMError, LocalPolicyLLM,
                                      ScriptedCritic)

OPERATIONS = ("ADD", "UPDATE", "DELETE", "NONE")


@dataclasses.dataclass(frozen=True)
class Operation:
    operation: str          # ADD | UPDATE | DELETE | NONE
    id: int | None = None   # the entry's id for UPDATE / DELETE (ids of the library the LLM was shown)
    content: str = ""       # the entry's text for ADD / UPDATE


# ---- parsing the LLM's JSON

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def _json_list(text: str) -> list:
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e}): {text[:200]!r}") from None
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON list, got {type(value).__name__}: {text[:200]!r}")
    return value


def parse_operations(text: str) -> list[Operation]:
    """A JSON list of {"operation", "id", "content"} (a ```json fence is tolerated). UPDATE and
    DELETE need an integer id; ADD and UPDATE need a non-empty content; DELETE needs no content."""
    ops = []
    for i, item in enumerate(_json_list(text)):
        if not isinstance(item, dict) or not isinstance(item.get("operation"), str):
            raise ValueError(f"operation {i}: expected an object with an 'operation' string, got {item!r}")
        name = item["operation"].strip().upper()
        if name not in OPERATIONS:
            raise ValueError(f"operation {i}: unknown operation {item['operation']!r}; expected one of {OPERATIONS}")
        entry_id = item.get("id")
        if name in ("UPDATE", "DELETE"):
            if isinstance(entry_id, str) and entry_id.strip().isdigit():
                entry_id = int(entry_id)
            if not isinstance(entry_id, int) or isinstance(entry_id, bool) or entry_id < 0:
                raise ValueError(f"operation {i}: {name} needs a non-negative integer 'id', got {entry_id!r}")
        else:
            entry_id = None
        content = item.get("content", "")
        if name in ("ADD", "UPDATE") and (not isinstance(content, str) or not content.strip()):
            raise ValueError(f"operation {i}: {name} needs a non-empty 'content' string, got {content!r}")
        ops.append(Operation(name, entry_id, content.strip() if name in ("ADD", "UPDATE") else ""))
    return ops


def parse_experiences(text: str, limit: int) -> list[str]:
    """A JSON list of strings (fence tolerated); empty ones dropped, the first `limit` kept."""
    items = _json_list(text)
    if not all(isinstance(x, str) for x in items):
        raise ValueError(f"expected a JSON list of strings, got {items!r}"[:300])
    return [x.strip() for x in items if x.strip()][:limit]


# ---- the library's operations (pure)

def resolve_conflicts(ops: list[Operation]) -> list[Operation]:
    """Deterministic conflict resolution before applying: NONE dropped; DELETE of an id wins over
    every UPDATE of it, in either order (one DELETE kept); several UPDATEs of one id merged into one
    whose content is their distinct contents in order, joined by ';'; identical ADDs merged. The
    result keeps the order of each surviving operation's first appearance."""
    deleted = {op.id for op in ops if op.operation == "DELETE"}
    updates: dict[int, list[str]] = {}
    for op in ops:
        if op.operation == "UPDATE" and op.id not in deleted and op.content not in updates.setdefault(op.id, []):
            updates[op.id].append(op.content)
    out, seen = [], set()
    for op in ops:
        key = (op.operation, op.id if op.operation != "ADD" else op.content)
        if op.operation == "NONE" or key in seen or (op.operation == "UPDATE" and op.id in deleted):
            continue
        seen.add(key)
        out.append(Operation("UPDATE", op.id, ";".join(updates[op.id])) if op.operation == "UPDATE" else op)
    return out


def apply_operations(library: list[str], ops: list[Operation]) -> list[str]:
    """The library after `ops`, applied in order against the ids it was shown (entry i has id i):
    ADD appends; UPDATE replaces an entry's text, or appends when the id is unknown (or already
    deleted: resolve_conflicts first); DELETE removes, an unknown id is ignored. Ids are then
    renumbered 0..n-1 (the list's positions)."""
    entries = dict(enumerate(library))
    fresh = len(library)
    for op in ops:
        if op.operation == "ADD" or (op.operation == "UPDATE" and op.id not in entries):
            entries[fresh], fresh = op.content, fresh + 1
        elif op.operation == "UPDATE":
            entries[op.id] = op.content
        elif op.operation == "DELETE":
            entries.pop(op.id, None)
    return list(entries.values())


def bound_library(library: list[str], max_size: int) -> list[str]:
    """At most max_size entries: on overflow the oldest (lowest ids) are evicted."""
    return library[-max_size:] if len(library) > max_size else list(library)


def policy_prefix(library: list[str], alphabet: str, max_chars: int) -> str:
    """The library as the policy reads it: of the entries written in the alphabet (without ';'), the
    newest ones whose total fits in max_chars characters (stopping at the first that does not), in
    library order, each followed by ';' ("12+34=46;5+7=12;")."""
    allowed, kept, used = set(alphabet) - {";"}, [], 0
    for entry in reversed(library):
        if not entry or not set(entry) <= allowed:
            continue
        if used + len(entry) + 1 > max_chars:
            break
        kept.append(entry)
        used += len(entry) + 1
    return "".join(e + ";" for e in reversed(kept))


# ---- the loop

@dataclasses.dataclass
class TrainingFreeOptions:
    llm: str = "policy"                 # the critic: "policy" (the run's model), "scripted", "http"
    base_url: str = ""                  # llm="http": the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    model: str = ""                     # llm="http": the served model's name
    api_key_env: str = "OPENAI_API_KEY"  # llm="http": environment variable holding the key (never saved)
    timeout_s: float = 30.0             # llm="http": per request
    max_retries: int = 2                # llm="http": retries of HTTP 429/5xx, timeouts, refused connections
    llm_temperature: float = 0.7        # the critic's sampling temperature (ours)
    llm_max_tokens: int = 1024          # the critic's reply limit (the policy critic writes at most 16)
    rollout_temperature: float = 0.7    # §2.32 (reference default)
    num_experiences_per_query: int = 2  # §2.32 (reference config default; its math preset uses 1)
    max_json_retries: int = 3           # §2.32: retries of a reply that does not parse, then NONE
    max_size: int = 50                  # library bound (the reference has none); oldest evicted first
    prompt_chars: int = 40              # characters of library the policy's prompt holds (64 positions)
    on_llm_error: str = "skip"          # LLMError: "skip" (warn, library unchanged this step) or "raise"
    library_path: str = ""              # an initial library: a library.json, or a JSON list of strings

    def __post_init__(self):
        if self.llm not in ("policy", "scripted", "http"):
            raise ValueError(f"llm must be 'policy', 'scripted' or 'http', got {self.llm!r}")
        if self.llm == "http" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s):// URL with llm='http', got {self.base_url!r}")
        if self.llm == "http" and not self.model:
            raise ValueError("model (the served model's name) is required with llm='http'")
        if self.on_llm_error not in ("skip", "raise"):
            raise ValueError(f"on_llm_error must be 'skip' or 'raise', got {self.on_llm_error!r}")
        for name in ("max_size", "num_experiences_per_query", "llm_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_retries", "max_json_retries", "prompt_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rollout_temperature", "llm_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.library_path and not os.path.isfile(self.library_path):
            raise ValueError(f"library_path {self.library_path!r} is not a file")


SYSTEM = ("You maintain a library of short experiences that is put in front of a small model's prompts to help "
          "it solve a task. The small model can only read these characters: {alphabet!r}. Write every experience "
          "using only them (a worked example such as 37+45=82 is ideal); entries with other characters stay in the "
          "library but are never shown to it.")
REQUESTS = {
    "summarise": "Summarise this attempt in one sentence: what it answered and whether it was right. "
                 "Reply with the summary only.",
    "advantage": "These are summaries of several attempts at one question, with their rewards and the ground truth. "
                 "Compare them and write at most {limit} experiences that would help get such questions right. "
                 "Reply with only a JSON list of strings.",
    "group_update": "This is the experience library (id, content) and new experiences from one question. Propose "
                    "operations: ADD a new experience, UPDATE an entry by id (refine it), DELETE a contradicted or "
                    "harmful entry by id, NONE to keep. Reply with only a JSON list of objects "
                    '{{"operation": "ADD"|"UPDATE"|"DELETE"|"NONE", "id": <int, UPDATE/DELETE>, "content": '
                    "<string, ADD/UPDATE>}}.",
    "batch_update": "These operations on the library were proposed from several questions. Merge them into one "
                    "consistent plan: several UPDATEs of one id become one, DELETE overrides UPDATE of the same id, "
                    "similar ADDs are merged. Reply with only a JSON list of operations in the same format.",
}


class TrainingFreeGRPOLoop(DataLoop):
    """Training-free GRPO (§2.32): the policy's weights never change; the library in its prompt does."""

    Options = TrainingFreeOptions
    trains_parameters = False

    def __init__(self, run, options):
        super().__init__(run, options)
        opts = self.opts
        if opts.llm == "http":
            self.llm = ChatCompletionsClient(opts.base_url, opts.model, os.environ.get(opts.api_key_env) or None,
                                             opts.timeout_s, opts.max_retries)
        elif opts.llm == "scripted":
            self.llm = ScriptedCritic()
        else:
            self.llm = LocalPolicyLLM(run)
        self.library: list[str] = load_library(opts.library_path) if opts.library_path else []
        self.library = bound_library(self.library, opts.max_size)

    # ---- rollouts

    def prefix(self) -> str:
        return policy_prefix(self.library, self.run.tok.alphabet, self.opts.prompt_chars)

    def rewards(self, problems, completions) -> list[float]:
        return self.run.reward_model(self.run.task, problems, completions)[0]

    def step(self, step: int) -> dict:
        run, opts, G = self.run, self.opts, self.run.cfg.num_generations
        problems = run.task.sample(run.rng, run.cfg.num_prompts)
        prefix = self.prefix()
        _, completions = run.sample([prefix + p.prompt for p in problems], G, temperature=opts.rollout_temperature)
        rewards = self.rewards([p for p in problems for _ in range(G)], completions)
        groups = [(p, completions[i * G:(i + 1) * G], rewards[i * G:(i + 1) * G]) for i, p in enumerate(problems)]
        informative = [g for g in groups if max(g[2]) > min(g[2])]  # the zero-advantage groups dropped
        self.stats = dict.fromkeys(("llm_calls", "parse_failures", "noop_calls", "llm_errors", "ops_proposed"), 0)
        resolved = []
        if informative:  # no informative group: no LLM call at all, the library unchanged
            try:
                resolved = resolve_conflicts(self.propose(informative))
            except LLMError as e:
                if opts.on_llm_error == "raise":
                    raise
                warnings.warn(f"training_free_grpo step {step}: {e}; the library is unchanged this step")
                self.stats["llm_errors"] += 1
        before = len(self.library)
        grown = apply_operations(self.library, resolved)
        self.library = bound_library(grown, opts.max_size)
        self.save(step + 1)
        return {"reward": sum(rewards) / len(rewards), "tf/informative_groups": len(informative),
                **{f"tf/{k}": v for k, v in self.stats.items()}, "tf/ops_applied": len(resolved),
                "tf/evicted": len(grown) - len(self.library), "tf/library_size": len(self.library),
                "tf/library_delta": len(self.library) - before, "tf/prefix_chars": len(prefix)}

    # ---- the LLM's four requests

    def propose(self, groups) -> list[Operation]:
        """The batch-merged operations of the informative groups (LLMError propagates)."""
        library = [{"id": i, "content": c} for i, c in enumerate(self.library)]
        limit, proposed = self.opts.num_experiences_per_query, []
        for problem, completions, rewards in groups:
            summaries = [{"summary": self.ask("summarise", question=problem.prompt, completion=c, reward=r),
                          "reward": r} for c, r in zip(completions, rewards)]
            experiences = self.ask("advantage", lambda t: parse_experiences(t, limit), question=problem.prompt,
                                   ground_truth=problem.answer, summaries=summaries, limit=limit)
            if experiences:  # nothing learnt from this question: no update call
                ops = self.ask("group_update", parse_operations, experiences=experiences, library=library) or []
                proposed += [op for op in ops if op.operation != "NONE"]
        self.stats["ops_proposed"] = len(proposed)
        if not proposed:
            return []
        operations = [{k: v for k, v in dataclasses.asdict(op).items() if v not in (None, "")} for op in proposed]
        return self.ask("batch_update", parse_operations, operations=operations, library=library) or []

    def ask(self, request: str, parse=None, **data):
        """One request; with `parse`, retried up to max_json_retries times on a reply that does not parse
        (the error fed back), then None: the call is a no-op."""
        opts = self.opts
        system = SYSTEM.format(alphabet=self.run.tok.alphabet)
        user = REQUESTS[request].format(limit=data.get("limit", 0))
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"{user}\n{PAYLOAD_MARKER} {json.dumps({'request': request, **data})}"}]
        for _ in range(opts.max_json_retries + 1 if parse else 1):
            self.stats["llm_calls"] += 1
            reply = self.llm.complete(messages, temperature=opts.llm_temperature, max_tokens=opts.llm_max_tokens)
            if parse is None:
                return reply
            try:
                return parse(reply)
            except ValueError as e:
                self.stats["parse_failures"] += 1
                messages = messages + [{"role": "assistant", "content": reply},
                                       {"role": "user", "content": f"That reply could not be used: {e}. "
                                                                   "Reply with only the JSON."}]
        self.stats["noop_calls"] += 1
        return None

    # ---- evaluation and state

    def evaluate(self) -> dict:
        """The trainer's plain evaluation, plus the greedy held-out accuracy with the library in the prompt."""
        run, row = self.run, self.run.evaluate()
        prefix = self.prefix()
        accuracy = row["eval/accuracy"]
        if prefix:
            task = types.SimpleNamespace(heldout=[dataclasses.replace(p, prompt=prefix + p.prompt)
                                                  for p in run.task.heldout[:run.cfg.eval_size]],
                                         reward=run.task.reward)
            accuracy = greedy_accuracy(run.policy, task, run.tok, run.cfg.eval_size, run.cfg.max_completion_length)
        return {**row, "eval/library_size": len(self.library), "eval/prefix_chars": len(prefix),
                "eval/accuracy_with_library": accuracy}

    def save(self, step: int) -> None:
        path = os.path.join(self.run.out_dir, "library.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"step": step, "max_size": self.opts.max_size, "prefix": self.prefix(),
                       "entries": [{"id": i, "content": c} for i, c in enumerate(self.library)]}, f, indent=1)
        os.replace(path + ".tmp", path)

    def state_dict(self) -> dict:
        return {"library": list(self.library)}

    def load_state_dict(self, state: dict, tensors) -> None:
        self.library = list(state["library"])


def load_library(path: str) -> list[str]:
    """A library.json ({"entries": [{"id", "content"}]}) or a JSON list of strings."""
    with open(path) as f:
        data = json.load(f)
    entries = data.get("entries") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"library_path {path!r}: expected a JSON list or {{'entries': [...]}}")
    out = [e["content"] if isinstance(e, dict) else e for e in entries]
    if not all(isinstance(e, str) for e in out):
        raise ValueError(f"library_path {path!r}: every entry must be a string (or {{'content': string}})")
    return out
