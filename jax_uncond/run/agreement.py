"""Start-up decisions taken once for every process of a multi-host run (shared/DESIGN.md).

A decision is either taken on process 0 and read by the others (`on_process_0`: which checkpoint to
resume, a refusal), or checked on every process and agreed (`all_or_none`, `failures`: a flag, a file or
a checkpoint that only one process sees as bad). Either way every process ends the same way: all go
on, or all stop with the same kind of error (a UsageError, exit code 2, or a RunError, exit code 1),
the others' line naming the process that failed. No process leaves alone while the others wait for it.

The processes exchange their answers through the key-value store of JAX's coordination service (no
device collectives, so nothing compiles), under keys named by the decision, so that a process that
failed early and skipped some exchanges still meets the others at the next. A process never waits for
one that will not answer: a lost process is found by the watchdog (`peers.py`), and one that failed
outside an exchange tells the others through it; either way the watchdog ends the waiting ones. In a
single-process run every function here is a plain call.
"""

from __future__ import annotations

import collections
import contextlib
import json
from typing import Any, Callable, Iterator, TypeVar

import jax

from jax_uncond.errors import RunError, UsageError
from jax_uncond.run import distributed
from jax_uncond.training.config import TrainConfig, to_dict

KEY = "jax_uncond/agreement/"
POLL_MS = 10_000
"""Each wait for another process's answer is a blocking read of this many milliseconds, repeated."""
PER_PROCESS_FLAGS = frozenset({"process_id", "local_rank", "cache_dir", "dataloader_num_workers", "explicit_flags"})
"""Flags that may differ between processes (host-local paths and workers); all the others must agree."""

T = TypeVar("T")
_uses: collections.Counter[str] = collections.Counter()
"""How often each exchange was made: a decision taken twice (a restore of the same step) gets a key per time."""


def _client() -> Any:
    return distributed.coordination_client()


def _key(name: str) -> str:
    _uses[name] += 1
    return f"{KEY}{name}#{_uses[name]}"


def _read(key: str) -> str:
    """The value of `key` once some process has written it (waits as long as that takes)."""
    while True:
        try:
            return _client().blocking_key_value_get(key, POLL_MS)
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise


def _record(error: UsageError | RunError | None, value: Any = None) -> str:
    if error is None:
        return json.dumps({"value": value})
    return json.dumps({"error": str(error), "usage": isinstance(error, UsageError)})


def _error(record: dict[str, Any], process: int) -> UsageError | RunError:
    """The error another process met, as this process raises it: same kind, naming that process."""
    kind = UsageError if record["usage"] else RunError
    return kind(f"process {process} of {jax.process_count()}: {record['error']}")


def failures(name: str, cause: str | None) -> dict[int, str]:
    """{process: cause} of every process whose `cause` is not None (this one's included), the same on every
    process. Every process must make this exchange, as often as the others."""
    if jax.process_count() == 1:
        return {} if cause is None else {0: cause}
    prefix = _key(name) + "/"
    _client().key_value_set(prefix + str(jax.process_index()), json.dumps(cause))
    answers = {p: json.loads(_read(prefix + str(p))) for p in range(jax.process_count())}
    return {p: c for p, c in answers.items() if c is not None}


def on_process_0(name: str, decide: Callable[[], T]) -> T:
    """`decide()` run on process 0 only (its result JSON-able, e.g. lists, not tuples); every process returns
    that result, or raises the UsageError or RunError process 0 raised. `decide` must hold no collective (nor
    an Orbax call that waits for every process): the others are not there to join it."""
    if jax.process_count() == 1:
        return decide()
    key = _key(name)
    if jax.process_index() == 0:
        try:
            value = decide()
        except (UsageError, RunError) as e:
            _client().key_value_set(key, _record(e))
            raise
        _client().key_value_set(key, _record(None, value))
        return value
    record = json.loads(_read(key))
    if "error" in record:
        raise _error(record, 0)
    return record["value"]


@contextlib.contextmanager
def all_or_none(name: str) -> Iterator[None]:
    """Runs the block on every process: when it raises a UsageError or RunError on any of them, it raises one
    on all (the first failing process's, naming it). A failing process does not wait for the others' answers
    (they may be waiting elsewhere, for it): the others still in an exchange with it fail with it, the rest
    are ended by their watchdog."""
    error: UsageError | RunError | None = None
    try:
        yield
    except (UsageError, RunError) as e:
        error = e
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    prefix = _key(name) + "/"
    _client().key_value_set(prefix + str(jax.process_index()), _record(error))
    if error is not None:
        raise error
    for p in range(jax.process_count()):
        record = json.loads(_read(prefix + str(p)))
        if "error" in record:
            raise _error(record, p)


def same_flags(config: TrainConfig) -> None:
    """Every process must run with process 0's flags (but PER_PROCESS_FLAGS): processes that compiled different
    programs would wait for each other forever, or train apart. A difference is a UsageError on every process."""
    mine = json.loads(json.dumps({k: v for k, v in to_dict(config).items() if k not in PER_PROCESS_FLAGS},
                                 default=str))
    theirs = on_process_0("flags", lambda: mine)
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    with all_or_none("flags"):
        if differ:
            shown = ", ".join(f"--{k} {mine.get(k)} (process 0: {theirs.get(k)})" for k in differ)
            raise UsageError(f"the flags differ from process 0's: {shown}; start every process with the same flags "
                             "(only --process_id differs)")
