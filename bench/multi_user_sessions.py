"""A multi-user application through ARK's sessions, without them, and through llama_cpp.server, in one run.

U users (12 by default: more conversations than the two chat workers keep resident) each open a conversation with a
document of about 1,500 tokens (numbered facts, distinct per user, generated deterministically), then ask T short
questions (5 by default). The users take turns round robin — turn 1 of every user, then turn 2 of every user, … —
one request at a time, greedy, with a small `max_tokens`, so each conversation's state must survive the other
users' turns: on ARK it moves between the resident contexts and the host and disk tiers. Variants:

    (a) ARK, one shared default `openai.OpenAI()` client: it keeps cookies, so all users share one session (the
        shape of a web application with one global client);
    (b) ARK, one client per user: one session per user;
    (c) ARK without sessions (`extra_body={"session": "none"}`): every turn recomputes its whole history;
    (d) llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) on the chat workers' GGUF file and llama.cpp
        settings, with its prompt cache on (`--cache true`), RAM and disk variants (`--cache_type ram|disk`,
        default size 2 GiB): it saves the context's state after each completion, keyed by its tokens, and loads
        the saved state sharing the longest prefix with the next prompt when that beats what its single context
        holds. (Its disk cache takes an entry out when it looks one up, used or not: the next user's lookup
        removes the previous user's state, so interleaved users find nothing but the shared opening.)

Every ARK variant runs on its own freshly started stack (as `make run` starts it: Envoy, edge, registry, two chat
workers), so no variant finds another's states; (a) and (b), whose ratio has the tightest goal, run side by side
(both stacks up, each user's turn played on (a) then on (b)), so that the shared machine's drift hits both alike.
Each request is streamed; per request it records the latency (to the last chunk), the time to first token, the
prompt and reused (`cached_tokens`) tokens, and for ARK the tier that held the reused state (`ark_metadata`) and
the worker that served it (`x-ark-worker`). For (d), which reports no usage when streaming, the prompt tokens are
counted with the model's chat template and the computed ones are read from the server's own log (llama.cpp's
"prompt eval … tokens" line after each completion).

Goals (issue 14), at the last turns: (a) within 1.3x of (b); (a) and (b) >= 15x faster than (c) and than (d).

    .venv/bin/python -m bench.multi_user_sessions [--users 12] [--turns 5] [--doc-tokens 1500] [--max-tokens 16]
                                                  [--d-users N] [--d-disk-users N] [--variants a,b,c,d-ram,d-disk]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import llama_cpp
import openai
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from prometheus_client.parser import text_string_to_metric_families

from bench.session_ttft import ensure_llama_server, start_llama_server
from services.chat.engines.llama_cpp import llama_settings
from services.common.config import Capability, load_config, resolve_model_path
from tests.support.stack import RunningStack, start_stack

SYSTEM = "You are a helpful assistant. Answer questions about the user's notes briefly, in one sentence."
PLACES = ["harbour", "library", "orchard", "workshop", "observatory", "bakery", "station", "greenhouse", "mill"]
THINGS = ["lanterns", "maps", "barrels", "clocks", "letters", "keys", "bicycles", "kettles", "violins", "ropes"]
PEOPLE = ["Ada", "Bruno", "Chidi", "Dagny", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena"]
QUESTIONS = [
    "What does fact {k} say? Answer in one short sentence.",
    "Who catalogued the items in fact {k}?",
    "How many items does fact {k} mention, and which kind?",
    "In which year were the items of fact {k} recorded?",
    "Where are the items of fact {k} kept?",
    "Is fact {k} about {thing}? Answer yes or no, then why.",
]
VARIANTS = {
    "a": "(a) ARK, one shared default client",
    "b": "(b) ARK, one client per user",
    "c": "(c) ARK, no sessions",
    "d-ram": "(d) llama_cpp.server, RAM cache",
    "d-disk": "(d) llama_cpp.server, disk cache",
}


# -- the workload ------------------------------------------------------------------------------------------------------


def fact(rng: random.Random, user: int, k: int) -> str:
    return (
        f"Fact {k}: in the {rng.choice(PLACES)} of user {user}, shelf {rng.randint(1, 99)} holds "
        f"{rng.randint(2, 900)} {rng.choice(THINGS)} recorded in {rng.randint(1850, 2025)}, catalogued by "
        f"{rng.choice(PEOPLE)}, who marked them with the code {rng.randint(1000, 9999)}."
    )


def document(user: int, doc_tokens: int, count_tokens) -> tuple[str, int]:
    """Numbered facts for one user until the text reaches `doc_tokens` tokens; the text and its number of facts."""
    rng = random.Random(f"ark-bench-user-{user}")
    facts: list[str] = []
    while count_tokens("\n".join(facts)) < doc_tokens:
        facts.append(fact(rng, user, len(facts) + 1))
    return "\n".join(facts), len(facts)


def question(user: int, turn: int, facts: int) -> str:
    rng = random.Random(f"ark-bench-question-{user}-{turn}")
    return QUESTIONS[(user + turn) % len(QUESTIONS)].format(k=rng.randint(1, facts), thing=rng.choice(THINGS))


@dataclass
class Turn:
    """One request as measured by the client."""

    user: int
    turn: int  # 0: the document
    latency: float
    ttft: float
    prompt_tokens: int
    cached_tokens: int | None
    answer: str
    tier: str | None = None
    worker: str = ""
    server_ttft: float | None = None  # the worker's own time to first token (ark_metadata timings)
    session: str = ""  # x-ark-session: new or resumed


@dataclass
class Run:
    name: str
    users: int
    turns: list[Turn] = field(default_factory=list)
    seconds: float = 0.0  # the sum of its requests' latencies
    notes: list[str] = field(default_factory=list)

    def at(self, which: str) -> list[Turn]:
        last = max(t.turn for t in self.turns)
        if which == "last":
            return [t for t in self.turns if t.turn == last]
        if which == "later":
            return [t for t in self.turns if t.turn > 0]
        return [t for t in self.turns if t.turn == 0]


class Workload:
    """The users' documents and questions, and the model's chat template to count a request's prompt tokens."""

    def __init__(self, model_path: Path, users: int, turns: int, doc_tokens: int) -> None:
        self.vocab = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        meta = self.vocab.metadata
        self.formatter = Jinja2ChatFormatter(
            template=meta["tokenizer.chat_template"],
            eos_token=self.vocab._model.token_get_text(self.vocab.token_eos()),
            bos_token=self.vocab._model.token_get_text(self.vocab.token_bos()),
        )
        self.turns = turns
        self.docs = [document(u, doc_tokens, self.count) for u in range(users)]

    def count(self, text: str) -> int:
        return len(self.vocab.tokenize(text.encode(), add_bos=False, special=True))

    def prompt_tokens(self, messages: list[dict]) -> int:
        return self.count(self.formatter(messages=messages).prompt)

    def opening(self, user: int) -> list[dict]:
        text, facts = self.docs[user]
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"My notes:\n{text}\n\n{question(user, 0, facts)}"},
        ]

    def next_question(self, user: int, turn: int) -> dict:
        return {"role": "user", "content": question(user, turn, self.docs[user][1])}


# -- clients -----------------------------------------------------------------------------------------------------------


def ask(client: openai.OpenAI, messages: list[dict], max_tokens: int, extra: dict) -> tuple[float, float, dict]:
    """Stream one turn; (latency, ttft, what the response said)."""
    start = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    seen: dict = {
        "worker": raw.headers.get("x-ark-worker", ""),
        "session": raw.headers.get("x-ark-session", ""),
        "parts": [],
        "usage": None,
        "ark": None,
    }
    ttft = 0.0
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - start
            seen["parts"].append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            seen["usage"] = chunk.usage
        extra_fields = chunk.model_extra or {}
        if extra_fields.get("ark"):
            seen["ark"] = extra_fields["ark"]
    latency = time.perf_counter() - start
    return latency, ttft or latency, seen


@dataclass
class Side:
    """One variant being played: its clients, its users' histories and what was measured."""

    run: Run
    clients: list[openai.OpenAI]
    extra: dict
    histories: list[list[dict]]
    server_log: Path | None = None  # llama_cpp.server's log, to read what it computed
    offset: int = 0

    def step(self, workload: Workload, u: int, t: int, max_tokens: int) -> None:
        """User `u`'s turn `t`."""
        history = self.histories[u]
        if t:
            history.append(workload.next_question(u, t))
        latency, ttft, seen = ask(self.clients[u % len(self.clients)], history, max_tokens, self.extra)
        answer = "".join(seen["parts"])
        usage = seen["usage"]
        if usage is not None:
            prompt = usage.prompt_tokens
            details = usage.prompt_tokens_details
            cached = details.cached_tokens if details is not None else None
        else:
            prompt = workload.prompt_tokens(history)
            cached = None
        if self.server_log is not None:
            computed, self.offset = computed_tokens(self.server_log, self.offset)
            cached = None if computed is None else max(0, prompt - computed)
        ark = seen["ark"] or {}
        turn = Turn(u, t, latency, ttft, prompt, cached, answer, ark.get("state_tier"), seen["worker"])
        turn.server_ttft = (ark.get("timings") or {}).get("time_to_first_token_seconds")
        turn.session = seen["session"]
        self.run.turns.append(turn)
        self.run.seconds += latency
        history.append({"role": "assistant", "content": answer})


def play(workload: Workload, sides: list[Side], max_tokens: int) -> None:
    """All users' turns, round robin, one request at a time; with several sides, each user's turn is played on every
    side in a row, so that the machine's drift (it is shared) hits them alike."""
    for t in range(workload.turns + 1):
        for u in range(sides[0].run.users):
            for side in sides:
                if u < side.run.users:
                    side.step(workload, u, t, max_tokens)
        for side in sides:
            now = [x for x in side.run.turns if x.turn == t]
            print(
                f"  {side.run.name}: turn {t + 1}: median latency "
                f"{statistics.median(x.latency for x in now) * 1000:8.1f} ms, prompt "
                f"~{statistics.median(x.prompt_tokens for x in now):.0f} tokens, reused {share(now)}"
                + (f", tiers {dict(Counter(x.tier for x in now))}" if any(x.tier for x in now) else ""),
                flush=True,
            )


_PROMPT_EVAL = re.compile(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens")


def computed_tokens(log: Path, offset: int) -> tuple[int | None, int]:
    """Prompt tokens llama.cpp computed for the last completion (its perf line), read from the server's log."""
    text = log.read_text(errors="replace")
    found = _PROMPT_EVAL.findall(text[offset:])
    return (int(found[-1]) if found else None), len(text)


def share(turns: list[Turn]) -> str:
    known = [t for t in turns if t.cached_tokens is not None]
    if not known:
        return "n/a"
    return f"{sum(t.cached_tokens for t in known) / max(1, sum(t.prompt_tokens for t in known)):.0%}"


# -- ARK ---------------------------------------------------------------------------------------------------------------


def tier_metrics(stack: RunningStack, workers: int) -> str:
    """Per worker: states restored per tier, moves for lack of room, mean restore time (the chat worker's metrics)."""
    lines = []
    for i in range(workers):
        text = httpx.get(stack.metrics_url(f"chat-{i + 1}"), timeout=10).text
        hits: Counter = Counter()
        evictions: Counter = Counter()
        restore_sum = restore_count = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                tier = sample.labels.get("tier", "")
                if sample.name == "ark_chat_state_tier_hits_total":
                    hits[tier] += sample.value
                elif sample.name == "ark_chat_state_tier_evictions_total":
                    evictions[tier] += sample.value
                elif sample.name == "ark_chat_state_restore_seconds_sum":
                    restore_sum += sample.value
                elif sample.name == "ark_chat_state_restore_seconds_count":
                    restore_count += sample.value
        mean = f"{restore_sum / restore_count * 1000:.0f} ms" if restore_count else "-"
        lines.append(
            f"chat-{i + 1}: restored {dict((k, int(v)) for k, v in hits.items() if v)}, "
            f"pushed out {dict((k, int(v)) for k, v in evictions.items() if v)}, mean restore {mean}"
        )
    return "; ".join(lines)


def run_ark(variants: list[str], workload: Workload, users: int, max_tokens: int, tmp: Path) -> dict[str, Run]:
    """The variants side by side, each on its own fresh stack (all of them up at once), turns interleaved."""
    stacks: dict[str, RunningStack] = {}
    try:
        for variant in variants:
            started = time.perf_counter()
            stacks[variant] = start_stack(tmp / f"ark-{variant}")
            print(f"{VARIANTS[variant]}: stack up in {time.perf_counter() - started:.0f} s", flush=True)
        sides = []
        for variant, stack in stacks.items():
            kwargs = {"base_url": stack.base_url, "api_key": stack.api_key}
            # (a): the default client, shared: it keeps the session cookie for every user.
            clients = [openai.OpenAI(**kwargs) for _ in range(users if variant == "b" else 1)]
            extra = {"ark_metadata": True, **({"session": "none"} if variant == "c" else {})}
            histories = [workload.opening(u) for u in range(users)]
            sides.append(Side(Run(VARIANTS[variant], users), clients, extra, histories))
        play(workload, sides, max_tokens)
        for variant, side in zip(stacks, sides, strict=True):
            if variant != "c":
                side.run.notes.append(tier_metrics(stacks[variant], 2))
            for client in side.clients:
                client.close()
    finally:
        for stack in stacks.values():
            stack.stop()
    return {variant: side.run for variant, side in zip(stacks, sides, strict=True)}


# -- llama-cpp-python's server -----------------------------------------------------------------------------------------


def start_cached_llama_server(
    model_path: Path, settings: dict, cache_type: str, workdir: Path
) -> tuple[subprocess.Popen, str]:
    """`python -m llama_cpp.server` with its prompt cache on; the disk cache is written under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    extra = ("--cache", "true", "--cache_type", cache_type)
    return start_llama_server(model_path, settings, workdir / "server.log", extra=extra, cwd=workdir)


def run_llama_server(variant: str, workload: Workload, users: int, max_tokens: int, tmp: Path, model) -> Run:
    workdir = tmp / variant
    server, url = start_cached_llama_server(
        # One process alone on the machine: all of its cores (ARK's workers share them).
        resolve_model_path(model.path),
        llama_settings(model, env={})[0],
        variant.removeprefix("d-"),
        workdir,
    )
    print(VARIANTS[variant], flush=True)
    try:
        client = openai.OpenAI(base_url=url, api_key="none")
        histories = [workload.opening(u) for u in range(users)]
        side = Side(Run(VARIANTS[variant], users), [client], {}, histories, server_log=workdir / "server.log")
        play(workload, [side], max_tokens)
        run = side.run
        client.close()
    finally:
        server.terminate()
        server.wait(60)
    return run


# -- the report --------------------------------------------------------------------------------------------------------


def report(runs: dict[str, Run], reference: Run | None) -> None:
    print(
        f"\n{'variant':<36} {'users':>5} {'last turn: median':>17} {'total':>9} {'TTFT':>8} "
        f"{'later turns: median':>19} {'total':>9} {'reused':>7} {'turn 1':>8} {'all':>7}"
    )
    for run in runs.values():
        last, later, first = run.at("last"), run.at("later"), run.at("first")
        print(
            f"{run.name:<36} {run.users:>5} {statistics.median(t.latency for t in last) * 1000:14.0f} ms"
            f" {sum(t.latency for t in last):7.1f} s {statistics.median(t.ttft for t in last) * 1000:5.0f} ms"
            f" {statistics.median(t.latency for t in later) * 1000:16.0f} ms {sum(t.latency for t in later):7.1f} s"
            f" {share(later):>7} {statistics.median(t.latency for t in first):6.1f} s {run.seconds:5.0f} s"
        )
    print("\nlater turns (2..last): tier that held the reused state (ark_metadata), workers (x-ark-worker)")
    for key, run in runs.items():
        if not key.startswith("d"):
            tiers = Counter(t.tier or "none" for t in run.at("later"))
            workers = Counter(t.worker for t in run.turns)
            moved = sum(len({t.worker for t in run.turns if t.user == u}) > 1 for u in range(run.users))
            sessions = sum(t.session == "new" for t in run.turns)
            print(
                f"  {run.name}: tiers {dict(tiers)}; requests per worker {sorted(workers.values())}; "
                f"conversations that changed worker {moved}; sessions created {sessions}"
            )
            for note in run.notes:
                print(f"    {note}")
            for tier in sorted({t.tier or "none" for t in run.at("later")}):
                same = [t for t in run.at("later") if (t.tier or "none") == tier]
                worker_ttft = [t.server_ttft for t in same if t.server_ttft is not None]
                print(
                    f"    state from {tier:<8}: {len(same):3} turns, median latency "
                    f"{statistics.median(t.latency for t in same) * 1000:7.0f} ms, worker TTFT "
                    + (f"{statistics.median(worker_ttft) * 1000:7.0f} ms" if worker_ttft else "-")
                )
    if reference is not None:
        for key, run in runs.items():
            if key in ("a", "b"):
                pairs = zip(sorted(run.turns, key=_order), sorted(reference.turns, key=_order), strict=True)
                same = Counter(t.turn for t, r in pairs if t.answer == r.answer)
                per_turn = " ".join(f"{same[k]}/{run.users}" for k in range(max(t.turn for t in run.turns) + 1))
                print(f"  {run.name}: greedy answers identical to (c)'s, by turn: {per_turn}")

    if "a" in runs and "b" in runs:
        pairs = list(zip(sorted(runs["a"].turns, key=_order), sorted(runs["b"].turns, key=_order), strict=True))
        later = [(x, y) for x, y in pairs if x.turn > 0]
        print(
            f"  (a) against (b), turn by turn (what the machine's noise cannot move): the same reused tokens in "
            f"{sum(x.cached_tokens == y.cached_tokens for x, y in pairs)}/{len(pairs)} requests, the same tier in "
            f"{sum(x.tier == y.tier for x, y in later)}/{len(later)} later turns, the same answer in "
            f"{sum(x.answer == y.answer for x, y in pairs)}/{len(pairs)}"
        )

    def ratio(x: str, y: str, goal: str) -> None:
        if x not in runs or y not in runs:
            return
        for what, pick in (("median", statistics.median), ("total", sum)):
            num = pick([t.latency for t in runs[x].at("last")])
            den = pick([t.latency for t in runs[y].at("last")])
            if what == "total" and runs[x].users != runs[y].users:
                continue  # totals over different numbers of users do not compare
            print(f"  {x:>6} / {y:<6} last turns, {what:<6} latency: {num / den:6.2f}x   ({goal})")
        num = statistics.median(t.ttft for t in runs[x].at("last"))
        den = statistics.median(t.ttft for t in runs[y].at("last"))
        print(f"  {x:>6} / {y:<6} last turns, median TTFT:    {num / den:6.2f}x")

    print("\nratios (time of the first over the second):")
    ratio("a", "b", "goal <= 1.3")
    for slow in ("c", "d-ram", "d-disk"):
        for fast in ("a", "b"):
            ratio(slow, fast, "goal >= 15")


def _order(t: Turn) -> tuple[int, int]:
    return t.turn, t.user


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--turns", type=int, default=5, help="short turns after the document")
    parser.add_argument("--doc-tokens", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--d-users", type=int, default=None, help="users for (d) (default: all)")
    parser.add_argument("--d-disk-users", type=int, default=None, help="users for (d) disk (default: --d-users)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {','.join(VARIANTS)}")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")

    began = time.perf_counter()
    model = load_config(env={}).models_for(Capability.CHAT)[0]
    workload = Workload(resolve_model_path(model.path), args.users, args.turns, args.doc_tokens)
    print(
        f"{args.users} users, a document of ~{args.doc_tokens} tokens each ({workload.docs[0][1]} facts), then "
        f"{args.turns} short turns, round robin, greedy, max_tokens {args.max_tokens}; model {model.id}"
    )
    if any(v.startswith("d") for v in chosen):
        ensure_llama_server()
    tmp = Path(tempfile.mkdtemp(prefix="ark-bench-multi-user-"))
    runs: dict[str, Run] = {}
    # (a) and (b), whose ratio has the tightest goal, are played side by side; then (c), then each (d).
    together = [v for v in chosen if v in ("a", "b")]
    if together:
        runs.update(run_ark(together, workload, args.users, args.max_tokens, tmp))
    for variant in chosen:
        if variant in together:
            continue
        if variant == "c":
            runs.update(run_ark(["c"], workload, args.users, args.max_tokens, tmp))
        elif variant.startswith("d"):
            users = min((variant == "d-disk" and args.d_disk_users) or args.d_users or args.users, args.users)
            runs[variant] = run_llama_server(variant, workload, users, args.max_tokens, tmp, model)
            if users < args.users:
                runs[variant].name += f" ({users} of {args.users} users)"
    report(runs, runs.get("c"))
    records = {key: [dataclasses.asdict(t) for t in run.turns] for key, run in runs.items()}
    (tmp / "turns.json").write_text(json.dumps(records, indent=1))
    print(f"\nwhole benchmark: {time.perf_counter() - began:.0f} s (logs and every turn's record under {tmp})")


if __name__ == "__main__":
    main()
