"""What an idle keep-alive connection keeps alive (memory per connection, bench ``idle``).

One parked task per connection, no nursery of its own, and nothing of the last request
(its h11 event, header list, scope or RequestCycle) held by a parked frame.
"""

from __future__ import annotations

from typing import Any

import h11
import pytest
import trio
import trio.testing
from conftest import hello_app, run_server
from wire import Client, connect

from trioserve.connection.request_cycle import RequestCycle

pytestmark = pytest.mark.usefixtures("both_parsers")  # every test on h11 and httptools


def serving_tasks() -> list[trio.lowlevel.Task]:
    """The tasks that serve a connection: the accepted one, or the one it moved on to."""
    found: list[trio.lowlevel.Task] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.endswith((".serve_connection", ".continue_serving")):
            found.append(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return found


def request_objects(task: trio.lowlevel.Task) -> list[object]:
    """What the task's parked frames keep of a request."""
    kept: list[object] = []
    for frame, _ in task.iter_await_frames():
        for value in frame.f_locals.values():
            values = value if isinstance(value, tuple) else (value,)
            kept += [v for v in values if isinstance(v, (h11.Request, RequestCycle, dict))]
    return kept


async def idle_serving_task_name(app: Any) -> str:
    """Serve two keep-alive requests with ``app``; check that the idle connection is then
    one task without a nursery or anything of a request; return that task's name."""
    async with run_server(app) as server, await connect(server.addresses[0]) as stream:
        client = Client(stream)
        for _ in range(2):
            response, _ = await client.request()
            assert response.status_code == 200
        await trio.testing.wait_all_tasks_blocked()
        [task] = serving_tasks()  # (an app call's task has ended with it)
        assert task.child_nurseries == []
        assert request_objects(task) == []
        return task.name


async def test_idle_keep_alive_connection_is_one_task_without_nursery_or_request() -> None:
    await idle_serving_task_name(hello_app)


async def test_after_an_app_waited_the_idle_connection_is_one_task_too() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await trio.sleep(0)  # the connection moves on to a new task
        await hello_app(scope, receive, send)

    assert (await idle_serving_task_name(app)).endswith(".continue_serving")
