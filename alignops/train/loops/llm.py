"""The LLM that Training-free GRPO asks to summarise, compare and edit its experience library.

`LLM` is one method, `complete(messages, temperature=, max_tokens=) -> str`, over chat messages
({"role", "content"}). Three implementations:

- `ChatCompletionsClient`: an OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang,
  llama.cpp server, ...), standard library only. Transport failures raise `LLMError` naming the URL.
- `LocalPolicyLLM`: the run's own policy. The built-in char model reads and writes only the task
  alphabet, so it sees the messages with every other character dropped and never writes JSON.
- `ScriptedCritic`: a deterministic stand-in that reads the JSON payload of the loop's messages and
  answers as a competent critic would on the built-in tasks (worked examples as experiences), to
  show the mechanics of the library; it is not a language model.
"""

from __future__ import annotations

import json
import socket
import time
import typing
import urllib.error
import urllib.request

PAYLOAD_MARKER = "PAYLOAD:"  # the loop's user messages end with "PAYLOAD: {json}"


class LLMError(RuntimeError):
    """The LLM could not be asked: HTTP error, timeout, unreachable server, or a reply without
    choices[0].message.content."""


class LLM(typing.Protocol):
    def complete(self, messages: list[dict], *, temperature: float, max_tokens: int) -> str: ...


class ChatCompletionsClient:
    """POST {base_url}/chat/completions with {"model", "messages", "temperature", "max_tokens"};
    returns choices[0].message.content. HTTP 429/5xx, timeouts and refused connections are retried
    `max_retries` times (backoff doubling from `backoff_s`); the last failure, a 4xx, a body that is
    not JSON or a reply without the content field raise LLMError."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 30.0,
                 max_retries: int = 2, backoff_s: float = 0.5):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s

    def complete(self, messages: list[dict], *, temperature: float, max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body, headers)
            except _Transient as e:
                if attempt == self.max_retries:
                    raise LLMError(f"{e} (after {attempt + 1} attempts)") from None
                time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _post(self, body: bytes, headers: dict) -> str:
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        where = f"chat completions request to {self.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            excerpt = e.read()[:300].decode(errors="replace")
            error = _Transient if e.code == 429 or e.code >= 500 else LLMError
            raise error(f"{where} failed: HTTP {e.code} {e.reason}: {excerpt!r}") from None
        except (TimeoutError, socket.timeout):
            raise _Transient(f"{where} timed out after {self.timeout_s} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Transient(f"{where} timed out after {self.timeout_s} s") from None
            raise _Transient(f"{where} failed: {e.reason}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise LLMError(f"{where}: the response body is not JSON: {raw[:300].decode(errors='replace')!r}") from None
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{where}: the response has no choices[0].message.content: {str(reply)[:300]!r}") from None
        if not isinstance(content, str):
            raise LLMError(f"{where}: choices[0].message.content is {type(content).__name__}, not a string")
        return content


class _Transient(LLMError):
    """A failure worth retrying (HTTP 429/5xx, timeout, connection refused)."""


class LocalPolicyLLM:
    """The run's policy as the LLM: the messages' text, restricted to the tokenizer's alphabet and cut
    to its last `context_chars` characters, is the prompt; at most `max_new_tokens` tokens come back.
    The built-in char model can answer task prompts but cannot write JSON (the alphabet has no
    brackets or quotes), so every structured call fails to parse and becomes a no-op."""

    def __init__(self, run, context_chars: int = 40, max_new_tokens: int = 16):
        self.run, self.context_chars, self.max_new_tokens = run, context_chars, max_new_tokens

    def complete(self, messages: list[dict], *, temperature: float, max_tokens: int) -> str:
        alphabet = set(self.run.tok.alphabet)
        text = "".join(c for m in messages for c in str(m.get("content", "")) if c in alphabet)
        prompt = text[-self.context_chars:] if self.context_chars else ""
        _, completions = self.run.sample([prompt], 1, temperature=temperature,
                                         max_new_tokens=min(max_tokens, self.max_new_tokens))
        return completions[0]


def payload(messages: list[dict]) -> dict:
    """The JSON payload of the last user message that has one (what the loop asked)."""
    for m in reversed(messages):
        content = str(m.get("content", ""))
        if m.get("role") == "user" and PAYLOAD_MARKER in content:
            return json.loads(content.rsplit(PAYLOAD_MARKER, 1)[1])
    raise ValueError("no payload in the messages")


class ScriptedCritic:
    """A deterministic critic for the built-in tasks, answering the loop's four requests:
    summarise -> the trajectory as "question completion"; advantage -> for a group with correct and
    incorrect answers, the worked example question + ground truth; group update -> ADD a worked
    example whose question has no entry, UPDATE the entry of that question when its text differs,
    NONE otherwise; batch update -> the operations unchanged (conflicts are resolved by the loop).
    It uses the ground truth the loop shows it, as the reference's critic does."""

    def complete(self, messages: list[dict], *, temperature: float, max_tokens: int) -> str:
        data = payload(messages)
        request = data["request"]
        if request == "summarise":
            return f"{data['question']}{data['completion']} (reward {data['reward']})"
        if request == "advantage":
            rewards = [s["reward"] for s in data["summaries"]]
            informative = max(rewards) > min(rewards)
            return json.dumps([data["question"] + data["ground_truth"]] if informative else [])
        if request == "group_update":
            ops = []
            for experience in data["experiences"]:
                question = experience.split("=", 1)[0] + "=" if "=" in experience else experience
                same = [e for e in data["library"] if e["content"].startswith(question)]
                if not same:
                    ops.append({"operation": "ADD", "content": experience})
                elif same[0]["content"] != experience:
                    ops.append({"operation": "UPDATE", "id": same[0]["id"], "content": experience})
                else:
                    ops.append({"operation": "NONE"})
            return json.dumps(ops)
        if request == "batch_update":
            return json.dumps(data["operations"])
        raise ValueError(f"unknown request {request!r}")
