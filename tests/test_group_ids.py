"""A long group id is shortened wherever a message quotes it, as task ids are."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from celery_perkey_backend.errors import BackendUnavailableError, StoreCommandError
from celery_perkey_backend.testing.server import free_port

#: 1 MB, after a start a message must still name.
GROUP_ID = "grp-start-" + "x" * (1 << 20)


def test_restoring_a_huge_group_id_over_the_wrong_type_names_it_briefly(
    app: Any, r: redis.Redis
) -> None:
    r.rpush(app.backend.layout.group(GROUP_ID), "not a saved group")
    with pytest.raises(StoreCommandError) as info:
        app.GroupResult.restore(GROUP_ID)
    message = str(info.value)
    assert len(message) < 1000, len(message)
    assert "restore group 'grp-start-" in message
    assert "(key 'celery-perkey:g:" in message


@pytest.mark.parametrize("call", ["restore", "delete"])
def test_a_huge_group_id_on_an_unreachable_server_is_named_briefly(
    make_app: Any, call: str
) -> None:
    app = make_app(
        backend=f"perkey://127.0.0.1:{free_port()}/0",
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
    )
    with pytest.raises(BackendUnavailableError) as info:
        if call == "restore":
            app.GroupResult.restore(GROUP_ID)
        else:
            app.GroupResult(GROUP_ID, []).delete()
    message = str(info.value)
    assert len(message) < 1000, len(message)
    assert f"{call} group 'grp-start-" in message
