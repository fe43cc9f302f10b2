#!/usr/bin/env python3
"""Checks the prism-sync simulator against the official Micro Python SDK (micro-so).

The SDK parses every response with strict validation on, so a field the simulator names or types
differently from the real API fails here. Two ways to run it:

    python ci/sdk_check.py BASE_URL API_KEY TEAM_ID     # a simulator that is already running
    python ci/sdk_check.py --spawn CMD [ARG ...]        # start one, check it, stop it

Missing BASE_URL/API_KEY/TEAM_ID come from MICRO_BASE_URL, MICRO_API_KEY and MICRO_TEAM_ID. With
--spawn, the script appends `--listen 127.0.0.1:0 --api-key K --team T` to CMD (e.g.
`target/debug/prism-sync simulate`), reads the address from the line the simulator prints, and stops
it with SIGINT at the end. Exits non-zero, naming the failed check, if any check fails; the last line
is "sdk_check: N passed, N failed".
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from typing import Callable

try:
    import micro_so
    from micro_so import AuthenticationError, BadRequestError, ConflictError, Micro
except ImportError as err:  # pragma: no cover - environment problem, reported plainly
    sys.exit(f"sdk_check: cannot import the micro-so SDK ({err}); pip install -r ci/sdk-requirements.txt")


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


SPAWN_KEY = os.environ.get("MICRO_API_KEY") or "sdk-check-key"
SPAWN_TEAM = os.environ.get("MICRO_TEAM_ID") or "6f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f"
SPAWNED: subprocess.Popen | None = None


def spawn(command: list[str]) -> str:
    """Starts the simulator and returns its base URL, from the line it prints when listening."""
    global SPAWNED
    if not command:
        sys.exit("sdk_check: --spawn needs a command, e.g. --spawn target/debug/prism-sync simulate")
    full = [*command, "--listen", "127.0.0.1:0", "--api-key", SPAWN_KEY, "--team", SPAWN_TEAM]
    try:
        SPAWNED = subprocess.Popen(full, stdout=subprocess.PIPE, text=True)
    except OSError as err:
        sys.exit(f"sdk_check: cannot start {full[0]}: {err}")
    lines: queue.Queue[str | None] = queue.Queue()

    def pump(stream) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, args=(SPAWNED.stdout,), daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            sys.exit(f"sdk_check: the simulator exited ({SPAWNED.wait()}) before it was listening")
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return match.group(1)
    stop_spawned()
    sys.exit("sdk_check: the simulator did not say where it listens within 60 s")


def stop_spawned() -> None:
    if SPAWNED is None or SPAWNED.poll() is not None:
        return
    SPAWNED.send_signal(signal.SIGINT)
    try:
        SPAWNED.wait(timeout=10)
    except subprocess.TimeoutExpired:
        SPAWNED.kill()
        SPAWNED.wait()


def settings() -> tuple[str, str, str]:
    args = sys.argv[1:]
    if args[:1] == ["--spawn"]:
        return spawn(args[1:]), SPAWN_KEY, SPAWN_TEAM
    names = ["MICRO_BASE_URL", "MICRO_API_KEY", "MICRO_TEAM_ID"]
    values = [args[i] if len(args) > i else os.environ.get(name, "") for i, name in enumerate(names)]
    missing = [name for name, value in zip(names, values) if not value]
    if missing:
        sys.exit(f"sdk_check: missing {', '.join(missing)} (pass BASE_URL API_KEY TEAM_ID, set them, or use --spawn)")
    return values[0], values[1], values[2]


BASE_URL, API_KEY, TEAM_ID = settings()


def client(api_key: str = API_KEY) -> Micro:
    # No retries: the SDK retries 409 and 5xx by default, which would hide what the server said first.
    return Micro(
        api_key=api_key,
        team_id=TEAM_ID,
        base_url=BASE_URL,
        max_retries=0,
        timeout=10.0,
        _strict_response_validation=True,
    )


def items(n: int, tag: str) -> list[dict]:
    return [{"id": str(uuid.uuid4()), "default": {"tag": tag, "n": i}} for i in range(n)]


def error_code(err: Exception) -> str | None:
    body = getattr(err, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


def check_bulk_update_returns_parsed_results_and_summary() -> None:
    sent = items(3, "parsed")
    response = client().prism.objects.contacts.bulk_update(items=sent, idempotency_key=str(uuid.uuid4()))
    expect(len(response.results) == 3, f"expected 3 results, got {len(response.results)}")
    for result, item in zip(response.results, sent):
        expect(result.id == item["id"], f"result id {result.id!r} != sent {item['id']!r}")
        expect(result.status == "ok", f"status {result.status!r} for {item['id']}")
        expect(result.error is None, f"unexpected error {result.error!r}")
        expect(result.record is not None and result.record.id == item["id"], "record missing or wrong id")
        expect(result.record.default == item["default"], f"record default {result.record.default!r}")
    summary = response.summary
    expect((summary.total, summary.succeeded, summary.failed) == (3, 3, 0), f"summary {summary!r}")


def check_a_repeated_key_is_replayed() -> None:
    raw_api = client().prism.objects.contacts.with_raw_response
    key = f"sdk-replay-{uuid.uuid4()}"
    sent = items(2, "replay")
    first = raw_api.bulk_update(items=sent, idempotency_key=key)
    expect(first.headers.get("idempotent-replay") is None, "the first response claims to be a replay")
    second = raw_api.bulk_update(items=sent, idempotency_key=key)
    expect(
        second.headers.get("idempotent-replay") == "true",
        f"idempotent-replay header is {second.headers.get('idempotent-replay')!r}",
    )
    expect(second.http_response.content == first.http_response.content, "the replay differs from the first body")
    parsed = second.parse()
    expect(parsed.summary.succeeded == 2, f"replayed summary {parsed.summary!r}")


def check_the_same_key_with_another_body_is_a_conflict() -> None:
    contacts = client().prism.objects.contacts
    key = f"sdk-mismatch-{uuid.uuid4()}"
    contacts.bulk_update(items=items(1, "first"), idempotency_key=key)
    try:
        contacts.bulk_update(items=items(1, "second"), idempotency_key=key)
    except ConflictError as err:
        expect(err.status_code == 409, f"status {err.status_code}")
        code = error_code(err)
        expect(code == "idempotency_key_mismatch", f"error code {code!r}, body {err.body!r}")
        expect("idempotency_key_mismatch" in str(err), f"message does not name the code: {err}")
        return
    raise CheckFailed("no ConflictError for a reused key with another body")


def check_a_wrong_key_is_an_authentication_error() -> None:
    try:
        client(api_key="definitely-not-the-key").prism.objects.contacts.bulk_update(items=items(1, "auth"))
    except AuthenticationError as err:
        expect(err.status_code == 401, f"status {err.status_code}")
        expect(error_code(err) is not None, f"401 without a JSON error code: {err.body!r}")
        return
    raise CheckFailed("no AuthenticationError for a wrong API key")


def check_101_items_is_a_bad_request() -> None:
    try:
        client().prism.objects.contacts.bulk_update(items=items(101, "too-many"))
    except BadRequestError as err:
        expect(err.status_code == 400, f"status {err.status_code}")
        return
    raise CheckFailed("no BadRequestError for 101 items")


def check_an_unparseable_id_comes_back_as_none() -> None:
    good = items(1, "good")
    response = client().prism.objects.contacts.bulk_update(items=[{"id": "not-a-uuid", "default": {}}, *good])
    first, second = response.results
    expect(first.id is None, f"id {first.id!r} for an unparseable input")
    expect(first.status == "error", f"status {first.status!r}")
    expect(first.error is not None and first.error.code == "invalid_id", f"error {first.error!r}")
    expect(second.status == "ok" and second.id == good[0]["id"], f"the good item: {second!r}")
    expect((response.summary.succeeded, response.summary.failed) == (1, 1), f"summary {response.summary!r}")


def check_bulk_delete_removes_records_then_answers_not_found() -> None:
    contacts = client().prism.objects.contacts
    sent = items(2, "delete")
    contacts.bulk_update(items=sent)
    ids = [item["id"] for item in sent]
    response = contacts.bulk_delete(ids=ids, idempotency_key=str(uuid.uuid4()))
    expect([r.id for r in response.results] == ids, f"result ids {[r.id for r in response.results]!r}")
    for result in response.results:
        expect(result.status == "ok" and result.error is None, f"delete result {result!r}")
        expect(result.record is None, f"a delete result carries a record: {result.record!r}")
    summary = response.summary
    expect((summary.total, summary.succeeded, summary.failed) == (2, 2, 0), f"summary {summary!r}")
    again = contacts.bulk_delete(ids=[ids[0], "not-a-uuid"])
    gone, bad = again.results
    expect(gone.status == "error" and gone.error is not None, f"second delete {gone!r}")
    expect(gone.error.code == "not_found", f"error {gone.error!r}")
    expect(bad.id is None and bad.error is not None and bad.error.code == "invalid_id", f"bad id {bad!r}")


def check_another_object_type_has_the_same_shape() -> None:
    response = client().prism.objects.organizations.bulk_update(items=items(2, "org"))
    expect(response.summary.succeeded == 2, f"organizations summary {response.summary!r}")


CHECKS: list[Callable[[], None]] = [
    check_bulk_update_returns_parsed_results_and_summary,
    check_a_repeated_key_is_replayed,
    check_the_same_key_with_another_body_is_a_conflict,
    check_a_wrong_key_is_an_authentication_error,
    check_101_items_is_a_bad_request,
    check_an_unparseable_id_comes_back_as_none,
    check_bulk_delete_removes_records_then_answers_not_found,
    check_another_object_type_has_the_same_shape,
]


def main() -> int:
    version = getattr(micro_so, "__version__", "?")
    print(f"sdk_check: micro-so {version} against {BASE_URL}")
    failures = 0
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            check()
        except CheckFailed as err:
            failures += 1
            print(f"FAIL {name}: {err}")
        except Exception as err:  # an unexpected SDK exception is a failure with its traceback
            failures += 1
            print(f"FAIL {name}: {type(err).__name__}: {err}")
            traceback.print_exc()
        else:
            print(f"ok   {name}")
    print(f"sdk_check: {len(CHECKS) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        status = main()
    finally:
        stop_spawned()
    sys.exit(status)
