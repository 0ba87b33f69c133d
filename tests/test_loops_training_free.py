"""Training-free GRPO (docs/methods.md §2.32): the library's operations (parsing, conflict
resolution, applying, bounding), the policy-prompt rendering, the chat-completions client against a
server on 127.0.0.1 (a valid reply, a body that is not JSON, HTTP 500, a timeout), and the loop: no
LLM call without an informative group, failures leave the library unchanged, parameters never
change, the library is saved and resumed."""

import http.server
import itertools
import json
import os
import random
import threading
import time

import pytest
import torch

from alignops.train.loops.base import Run, parse_options
from alignops.train.loops.llm import ChatCompletionsClient, LLMError, LocalPolicyLLM, ScriptedCritic, payload
from alignops.train.loops.training_free import (Operation, TrainingFreeGRPOLoop, apply_operations, bound_library,
                                                parse_experiences, parse_operations, policy_prefix,
                                                resolve_conflicts)
from alignops.train.presets import make_config
from alignops.train.rewards import RewardModel
from alignops.train.rollout import GroupSeeds
from alignops.train.trainer import setup, train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)
ADD, UPDATE, DELETE, NONE = (lambda c: Operation("ADD", None, c)), (lambda i, c: Operation("UPDATE", i, c)), \
    (lambda i: Operation("DELETE", i)), Operation("NONE")


# ---- parsing

def test_parse_operations_reads_a_fenced_list_and_needs_no_content_for_delete():
    text = '```json\n[{"operation": "ADD", "content": " 1+2=3 "}, {"operation": "update", "id": "4", ' \
           '"content": "5+5=10"}, {"operation": "DELETE", "id": 0}, {"operation": "NONE"}]\n```'
    assert parse_operations(text) == [ADD("1+2=3"), UPDATE(4, "5+5=10"), DELETE(0), NONE]
    assert parse_operations("[]") == []


@pytest.mark.parametrize("text, match", [
    ("37+45=82", "not valid JSON"),
    ('{"operation": "ADD", "content": "x"}', "expected a JSON list, got dict"),
    ('[{"operation": "MODIFY", "id": 1}]', "unknown operation 'MODIFY'"),
    ('[{"operation": "UPDATE", "content": "x"}]', "UPDATE needs a non-negative integer 'id'"),
    ('[{"operation": "DELETE", "id": true}]', "DELETE needs a non-negative integer 'id'"),
    ('[{"operation": "ADD", "content": "  "}]', "ADD needs a non-empty 'content'"),
    ('["ADD"]', "expected an object with an 'operation' string"),
])
def test_parse_operations_rejects_anything_else(text, match):
    with pytest.raises(ValueError, match=match):
        parse_operations(text)


def test_parse_experiences_keeps_at_most_the_limit_and_rejects_non_strings():
    assert parse_experiences('["a", "", "b", "c"]', 2) == ["a", "b"]
    with pytest.raises(ValueError, match="list of strings"):
        parse_experiences('["a", 3]', 2)


# ---- conflict resolution and applying (the §2.32 test oracle)

@pytest.mark.parametrize("ops", [[DELETE(1), UPDATE(1, "new")], [UPDATE(1, "new"), DELETE(1)],
                                 [UPDATE(1, "a"), DELETE(1), UPDATE(1, "b"), DELETE(1)]])
def test_delete_wins_over_update_of_the_same_id_in_either_order(ops):
    assert resolve_conflicts(ops) == [DELETE(1)]
    assert apply_operations(["e0", "e1", "e2"], resolve_conflicts(ops)) == ["e0", "e2"]


def test_without_resolution_an_update_after_a_delete_resurrects_the_entry():
    # the reference's quirk (§2.32) that resolve_conflicts exists to avoid
    assert apply_operations(["e0", "e1"], [DELETE(1), UPDATE(1, "new")]) == ["e0", "new"]


def test_several_updates_of_one_id_merge_in_order_and_none_and_identical_adds_collapse():
    ops = [NONE, UPDATE(0, "a"), ADD("x"), UPDATE(2, "z"), UPDATE(0, "b"), ADD("x"), UPDATE(0, "a"), NONE]
    assert resolve_conflicts(ops) == [UPDATE(0, "a;b"), ADD("x"), UPDATE(2, "z")]
    assert resolve_conflicts([NONE, NONE]) == [] and resolve_conflicts([]) == []


def test_apply_update_of_unknown_id_adds_delete_of_unknown_id_is_ignored_and_ids_renumber():
    library = ["e0", "e1", "e2"]
    out = apply_operations(library, [DELETE(0), UPDATE(7, "u7"), DELETE(9), UPDATE(2, "e2'"), ADD("n")])
    assert out == ["e1", "e2'", "u7", "n"]  # ids are now 0..3
    assert library == ["e0", "e1", "e2"]  # pure
    assert apply_operations([], []) == [] and apply_operations(["a"], [DELETE(0)]) == []
    ops = [ADD("p"), UPDATE(1, "q"), DELETE(0)]
    assert apply_operations(library, ops) == apply_operations(library, ops) == ["q", "e2", "p"]  # deterministic


def test_the_library_is_bounded_by_evicting_the_oldest():
    assert bound_library(["a", "b", "c", "d"], 2) == ["c", "d"]
    assert bound_library(["a"], 2) == ["a"]


def test_the_policy_prompt_keeps_the_newest_alphabet_only_entries_that_fit():
    alphabet = "0123456789+-*=;# "
    library = ["1+1=2", "add carefully", "12+30=42", "9+9=18", "1;2"]
    assert policy_prefix(library, alphabet, 100) == "1+1=2;12+30=42;9+9=18;"
    assert policy_prefix(library, alphabet, 16) == "12+30=42;9+9=18;"  # 9 + 7 characters
    assert policy_prefix(library, alphabet, 15) == "9+9=18;"
    assert policy_prefix(library, alphabet, 0) == "" and policy_prefix([], alphabet, 40) == ""


# ---- the chat-completions client against a server on 127.0.0.1

class Handler(http.server.BaseHTTPRequestHandler):
    requests: list = []
    reply_ops = [{"operation": "ADD", "content": "9+9=18"}]

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.requests.append((self.path, body))
        mode = self.path.split("/")[1]
        if mode == "error500":
            return self.send(500, b'{"error": "the model crashed"}')
        if mode == "malformed":
            return self.send(200, b'{"choices": [')
        if mode == "nocontent":
            return self.send(200, b'{"choices": []}')
        if mode == "slow":
            time.sleep(1.0)
        request = payload(body["messages"])["request"]
        content = {"summarise": "it answered", "advantage": '["9+9=18"]',
                   "group_update": "```json\n" + json.dumps(self.reply_ops) + "\n```",
                   "batch_update": json.dumps(self.reply_ops)}[request]
        self.send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    def send(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


ASK = [{"role": "user", "content": 'go\nPAYLOAD: {"request": "batch_update"}'}]


def test_the_client_posts_a_chat_completion_and_returns_the_content(server):
    Handler.requests.clear()
    client = ChatCompletionsClient(server + "/ok/v1/", "tiny", timeout_s=5, max_retries=0)
    assert json.loads(client.complete(ASK, temperature=0.5, max_tokens=7)) == Handler.reply_ops
    path, body = Handler.requests[-1]
    assert path == "/ok/v1/chat/completions"
    assert body == {"model": "tiny", "messages": ASK, "temperature": 0.5, "max_tokens": 7}


@pytest.mark.parametrize("mode, match", [
    ("malformed", r"/malformed/v1/chat/completions: the response body is not JSON"),
    ("nocontent", r"/nocontent/v1/chat/completions: the response has no choices\[0\].message.content"),
    ("error500", r"/error500/v1/chat/completions failed: HTTP 500 .*the model crashed.*after 2 attempts"),
    ("slow", r"/slow/v1/chat/completions timed out after 0.3 s"),
])
def test_the_client_raises_clear_errors_naming_the_url(server, mode, match):
    client = ChatCompletionsClient(f"{server}/{mode}/v1", "tiny", timeout_s=0.3, max_retries=1, backoff_s=0.01)
    with pytest.raises(LLMError, match=match) as info:
        client.complete(ASK, temperature=0.0, max_tokens=8)
    assert isinstance(info.value, RuntimeError) and server in str(info.value)


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(LLMError, match="http://127.0.0.1:9/v1/chat/completions failed"):
        ChatCompletionsClient("http://127.0.0.1:9/v1", "m", timeout_s=2, max_retries=0).complete(
            ASK, temperature=0.0, max_tokens=1)


# ---- the loop

def make_loop(tmp_path, rewards=None, library=(), **options):
    cfg = make_config("training_free_grpo", {**MICRO, "output_dir": str(tmp_path)})
    task, tok, policy = setup(cfg)
    run = Run(cfg, task, tok, policy, None, random.Random(0), GroupSeeds(0), RewardModel(cfg.reward_funcs),
              str(tmp_path))
    loop = TrainingFreeGRPOLoop(run, parse_options(TrainingFreeGRPOLoop, options, "training_free_grpo"))
    loop.library = list(library)
    if rewards is not None:  # rigged rewards, cycled over the rollouts in order
        cycle = itertools.cycle(rewards)
        loop.rewards = lambda problems, completions: [next(cycle) for _ in completions]
    return loop


class CountingLLM:
    def __init__(self, reply="[]"):
        self.calls, self.reply = [], reply

    def complete(self, messages, *, temperature, max_tokens):
        self.calls.append(payload(messages)["request"])
        return self.reply


@pytest.mark.parametrize("rewards", [[0.0], [1.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
def test_no_informative_group_means_no_llm_call_and_an_unchanged_library(tmp_path, rewards):
    loop = make_loop(tmp_path, rewards, library=["1+1=2"])
    loop.llm = CountingLLM('[{"operation": "DELETE", "id": 0}]')
    metrics = loop.step(0)
    assert loop.llm.calls == [] and loop.library == ["1+1=2"]
    assert metrics["tf/informative_groups"] == 0 and metrics["tf/llm_calls"] == 0
    assert metrics["reward"] == pytest.approx(sum(rewards * (8 // len(rewards))) / 8)


def test_the_scripted_critic_adds_the_worked_example_of_each_mixed_group(tmp_path):
    loop = make_loop(tmp_path, [1.0, 0.0], llm="scripted")
    problems = loop.run.task.sample(random.Random(0), 2)  # what the loop's rng (seed 0) draws
    metrics = loop.step(0)
    assert loop.library == [p.prompt + p.answer for p in problems]
    # 2 groups x (4 summaries + advantage + group update) + one batch update
    assert metrics["tf/llm_calls"] == 2 * 6 + 1 and metrics["tf/ops_applied"] == 2
    saved = json.load(open(tmp_path / "library.json"))
    assert [e["content"] for e in saved["entries"]] == loop.library and [e["id"] for e in saved["entries"]] == [0, 1]
    assert loop.prefix() == "".join(e + ";" for e in loop.library)


def test_the_scripted_critic_updates_the_entry_of_the_same_question(tmp_path):
    loop = make_loop(tmp_path, [1.0, 0.0], llm="scripted")
    first, second = loop.run.task.sample(random.Random(0), 2)
    loop.library = [first.prompt + "0", "5+5=10"]
    loop.step(0)
    assert loop.library == [first.prompt + first.answer, "5+5=10", second.prompt + second.answer]


def test_the_policy_as_critic_cannot_write_json_so_every_call_becomes_a_noop(tmp_path):
    loop = make_loop(tmp_path, [1.0, 0.0], library=["2+2=4"])
    assert isinstance(loop.llm, LocalPolicyLLM)
    metrics = loop.step(0)
    assert loop.library == ["2+2=4"]
    # per group: 4 summaries, then the advantage call 1 + 3 retries, all unparsable (the alphabet has no '[')
    assert metrics["tf/parse_failures"] == 2 * 4 and metrics["tf/noop_calls"] == 2
    assert metrics["tf/llm_calls"] == 2 * (4 + 4) and metrics["tf/ops_applied"] == 0


def test_an_unparsable_reply_is_retried_three_times_then_a_noop(tmp_path):
    loop = make_loop(tmp_path, [1.0, 0.0], library=["2+2=4"], max_json_retries=2)
    loop.llm = CountingLLM("not json")
    metrics = loop.step(0)
    assert loop.llm.calls == ["summarise"] * 4 + ["advantage"] * 3 + ["summarise"] * 4 + ["advantage"] * 3
    assert metrics["tf/parse_failures"] == 6 and loop.library == ["2+2=4"]


def test_the_http_critic_edits_the_library_as_its_operations_say(tmp_path, server, monkeypatch):
    monkeypatch.setattr(Handler, "reply_ops", [
        {"operation": "UPDATE", "id": 0, "content": "3+3=6"}, {"operation": "DELETE", "id": 1},
        {"operation": "ADD", "content": "9+9=18"}, {"operation": "UPDATE", "id": 1, "content": "ignored"}])
    loop = make_loop(tmp_path, [1.0, 0.0], library=["1+1=2", "2+2=5", "4+4=8"], llm="http",
                     base_url=server + "/ok/v1", model="tiny", timeout_s=5.0)
    metrics = loop.step(0)
    assert loop.library == ["3+3=6", "4+4=8", "9+9=18"] and metrics["tf/ops_applied"] == 3


@pytest.mark.parametrize("mode", ["malformed", "error500", "slow"])
def test_a_failing_endpoint_leaves_the_library_unchanged(tmp_path, server, mode):
    options = dict(llm="http", base_url=f"{server}/{mode}/v1", model="tiny", timeout_s=0.3, max_retries=0)
    loop = make_loop(tmp_path, [1.0, 0.0], library=["1+1=2"], **options)
    with pytest.warns(UserWarning, match=f"/{mode}/v1/chat/completions"):
        metrics = loop.step(0)
    assert loop.library == ["1+1=2"] and metrics["tf/llm_errors"] == 1 and metrics["tf/llm_calls"] == 1
    loop = make_loop(tmp_path, [1.0, 0.0], library=["1+1=2"], on_llm_error="raise", **options)
    with pytest.raises(LLMError, match=f"/{mode}/v1/chat/completions"):
        loop.step(0)
    assert loop.library == ["1+1=2"]


def test_the_library_is_bounded_in_the_loop(tmp_path):
    loop = make_loop(tmp_path, [1.0, 0.0], library=["a", "b"], llm="scripted", max_size=3)
    metrics = loop.step(0)
    assert len(loop.library) == 3 and loop.library[0] == "b" and metrics["tf/evicted"] == 1


def test_the_rollouts_and_the_evaluation_read_the_library(tmp_path):
    loop = make_loop(tmp_path, [0.0], library=["1+1=2", "2+2=4"])
    seen, sample = [], loop.run.sample
    loop.run.sample = lambda prompts, n, **kw: (seen.extend(prompts), sample(prompts, n, **kw))[1]
    loop.step(0)
    assert seen and all(p.startswith("1+1=2;2+2=4;") for p in seen)
    row = loop.evaluate()
    assert row["eval/library_size"] == 2 and 0.0 <= row["eval/accuracy_with_library"] <= 1.0
    loop.library = []
    row = loop.evaluate()
    assert row["eval/accuracy_with_library"] == row["eval/accuracy"] and row["eval/library_size"] == 0


def test_the_preset_runs_end_to_end_without_changing_a_parameter_and_resumes_the_library(tmp_path):
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps(["1+1=2", "2+2=4"]))
    overrides = {**MICRO, "output_dir": str(tmp_path / "run"),
                 "loop_kwargs": {"llm": "scripted", "library_path": str(seed)}}
    result = train(make_config("training_free_grpo", overrides))
    rows = result["log"]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy_with_library" in rows[-1]
    assert all("tf/library_size" in r for r in rows[1:]) and os.path.exists(tmp_path / "run" / "library.json")
    cfg = make_config("training_free_grpo", overrides)
    (_, _, initial), (_, _, trained) = setup(cfg), setup(cfg)
    from alignops.train import checkpoint as ckpt
    ckpt.load_model_weights(str(tmp_path / "run"), trained)
    for (k, x), y in zip(initial.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(x, y), k
    state = ckpt.load_json(os.path.join(ckpt.locate(str(tmp_path / "run")), "state.json"))
    loop = make_loop(tmp_path / "x")
    loop.load_state_dict(state["loop"], {})
    saved = json.load(open(tmp_path / "run" / "library.json"))
    assert loop.library == [e["content"] for e in saved["entries"]] and loop.library[:2] == ["1+1=2", "2+2=4"]
    assert rows[0]["eval/library_size"] >= 2


@pytest.mark.parametrize("kwargs, match", [
    ({"llm": "gpt"}, "llm must be 'policy', 'scripted' or 'http'"),
    ({"llm": "http"}, "base_url must be an http"),
    ({"llm": "http", "base_url": "http://127.0.0.1:1/v1"}, "model .* is required"),
    ({"max_size": 0}, "max_size must be >= 1"),
    ({"max_json_retries": -1}, "max_json_retries must be >= 0"),
    ({"on_llm_error": "ignore"}, "on_llm_error must be"),
    ({"library_path": "/no/such/library.json"}, "library_path"),
])
def test_bad_options_fail_before_training(tmp_path, kwargs, match):
    cfg = make_config("training_free_grpo", {**MICRO, "output_dir": str(tmp_path), "loop_kwargs": kwargs})
    with pytest.raises(ValueError, match=f"method 'training_free_grpo': {match}"):
        train(cfg)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_an_initial_library_loads_from_a_saved_library_json(tmp_path):
    path = tmp_path / "lib.json"
    path.write_text(json.dumps({"entries": [{"id": 0, "content": "1+1=2"}, {"id": 1, "content": "2+2=4"}]}))
    cfg = make_config("training_free_grpo", {**MICRO, "output_dir": str(tmp_path)})
    task, tok, policy = setup(cfg)
    run = Run(cfg, task, tok, policy, None, random.Random(0), GroupSeeds(0), RewardModel(cfg.reward_funcs), "")
    loop = TrainingFreeGRPOLoop(run, parse_options(TrainingFreeGRPOLoop, {"library_path": str(path)}, "x"))
    assert loop.library == ["1+1=2", "2+2=4"]


def test_the_scripted_critic_answers_each_request():
    ask = lambda **data: ScriptedCritic().complete(  # noqa: E731
        [{"role": "user", "content": "PAYLOAD: " + json.dumps(data)}], temperature=0.0, max_tokens=1)
    assert json.loads(ask(request="advantage", question="3+4=", ground_truth="7",
                          summaries=[{"reward": 0.0}, {"reward": 0.0}])) == []
    assert json.loads(ask(request="advantage", question="3+4=", ground_truth="7",
                          summaries=[{"reward": 1.0}, {"reward": 0.0}])) == ["3+4=7"]
    ops = json.loads(ask(request="group_update", experiences=["3+4=7", "1+2=3", "5+5=10"],
                         library=[{"id": 0, "content": "3+4=8"}, {"id": 1, "content": "1+2=3"}]))
    assert ops == [{"operation": "UPDATE", "id": 0, "content": "3+4=7"}, {"operation": "NONE"},
                   {"operation": "ADD", "content": "5+5=10"}]
