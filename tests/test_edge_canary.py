"""The edge's side of canary runs (issue 21): the repository load's canary parameters (REST and gRPC) and
GET /rollouts, /rollouts/{m}, in-process on tests/test_edge_app.py's fakes (a FakeManager that records the calls)."""

from __future__ import annotations

import asyncio
import base64
import json

import grpc
import pytest
from tritonclient.grpc import service_pb2

from cluster.errors import InferenceTimeoutError
from cluster.role_settings import EdgeSettings
from edge import create_app
from tests.edge_http import assert_error
from tests.test_edge_app import FakeBus, FakeManager, TestClient
from tests.test_edge_repository import grpc_stub

STATUS = {"model": "echo", "id": "ab12", "version": 2, "stable": 1, "phase": "loading", "outcome": "running"}


class CanaryManager(FakeManager):
    """FakeManager that also answers canary (its status) and rollouts with canaries (limited by name)."""

    async def call(self, what: str, timeout: float = 5.0, data: bytes | None = None, **fields):
        if what == "canary":
            self.calls.append((what, None, fields))
            return dict(STATUS, version=fields.get("version", 2))
        if what == "rollouts":
            self.calls.append((what, None, fields))
            if what in self.raises:
                raise self.raises[what]
            canaries = {"echo": STATUS, "other": dict(STATUS, model="other")}
            name = fields.get("name")
            return {
                "ok": 1,
                "failed": 0,
                "in_progress": 0,
                "canaries": {m: s for m, s in canaries.items() if name in (None, m)},
            }
        if what == "publish" and "canary" in fields:
            self.calls.append((what, len(data), fields))
            return dict(STATUS, version=fields["version"])
        return await super().call(what, timeout, data, **fields)


@pytest.fixture
def manager() -> CanaryManager:
    return CanaryManager()


def client(manager, **options) -> TestClient:
    app = create_app(EdgeSettings(**options), client=FakeBus(), manager=manager)
    return TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)


def test_a_load_with_canary_parameters_starts_a_canary_and_answers_its_status(manager):
    with client(manager) as http:
        parameters = {
            "canary": "10,50,100",
            "step": "2m",
            "shadow": "0.2",
            "retry": "false",
            "criteria": json.dumps({"alpha": 0.05}),
            "version": "2",
        }
        answer = http.post("/v2/repository/models/echo/load", json={"parameters": parameters})
        assert answer.status_code == 200 and answer.json()["id"] == "ab12", answer.text
        assert manager.calls[-1] == (
            "canary",
            None,
            {
                "name": "echo",
                "shadow_only": False,
                "steps": [10, 50, 100],
                "step_seconds": 120.0,
                "shadow": 0.2,
                "retry": False,
                "criteria": {"alpha": 0.05},
                "version": 2,
            },
        )
        answer = http.post("/v2/repository/models/echo/load", json={"parameters": {"shadow_only": True, "step": 5}})
        assert answer.status_code == 200
        assert manager.calls[-1][2] == {"name": "echo", "shadow_only": True, "step_seconds": 5.0}


def test_a_load_with_files_and_canary_publishes_with_the_canary(manager):
    with client(manager) as http:
        parameters = {"canary": [20, 100], "file:3/model.pt": base64.b64encode(b"weights").decode()}
        answer = http.post("/v2/repository/models/echo/load", json={"parameters": parameters})
        assert answer.status_code == 200 and answer.json()["version"] == 3, answer.text
        what, size, fields = manager.calls[-1]
        assert (
            what == "publish"
            and size == len(b"weights")
            and fields["canary"]
            == {
                "shadow_only": False,
                "steps": [20, 100],
            }
        )


@pytest.mark.parametrize(
    "parameters, says",
    [
        ({"canary": "50,10"}, "parameter 'canary': '50,10': give rising percents"),
        ({"canary": "10,100", "step": "soon"}, "parameter 'step': 'soon' is not a duration"),
        ({"canary": "10,100", "shadow": "lots"}, "parameter 'shadow': must be a fraction"),
        ({"canary": "10,100", "retry": "maybe"}, "parameter 'retry': must be true or false"),
        ({"canary": "10,100", "criteria": "[1]"}, "parameter 'criteria' must be a JSON object"),
        ({"canary": "10,100", "version": "v2"}, "parameter 'version': must be a version"),
        ({"shadow": 0.2}, "parameter 'shadow': belongs to a canary run"),
    ],
)
def test_bad_canary_parameters_are_400_and_never_reach_the_manager(manager, parameters, says):
    with client(manager) as http:
        assert_error(http.post("/v2/repository/models/echo/load", json={"parameters": parameters}), 400, says)
        assert manager.calls == []


def test_rollouts_routes_are_the_managers_answer(manager):
    with client(manager) as http:
        answer = http.get("/rollouts")
        assert answer.status_code == 200 and set(answer.json()["canaries"]) == {"echo", "other"}
        answer = http.get("/rollouts/echo")
        assert answer.status_code == 200 and list(answer.json()["canaries"]) == ["echo"]
        assert manager.calls[-1] == ("rollouts", None, {"name": "echo"})
        manager.raises["rollouts"] = InferenceTimeoutError("no answer from the manager within the deadline")
        assert_error(http.get("/rollouts"), 503, "is not answering")


def test_rollouts_need_a_token_and_canary_loads_an_admin_token(manager):
    with client(manager, edge_token=["tok-user"], edge_admin_token=["tok-admin"]) as http:
        assert http.get("/rollouts").status_code == 401
        assert http.get("/rollouts/echo").status_code == 401
        assert http.get("/rollouts", headers={"Authorization": "Bearer tok-user"}).status_code == 200
        load = {"parameters": {"canary": "10,100"}}
        user, admin = {"Authorization": "Bearer tok-user"}, {"Authorization": "Bearer tok-admin"}
        assert http.post("/v2/repository/models/echo/load", json=load, headers=user).status_code == 403
        assert http.post("/v2/repository/models/echo/load", json=load, headers=admin).status_code == 200


def test_grpc_load_passes_the_canary_parameters(manager):
    async def main():
        async with grpc_stub(manager) as stub:
            load = service_pb2.RepositoryModelLoadRequest(model_name="echo")
            load.parameters["canary"].string_param = "10,50,100"
            load.parameters["step"].int64_param = 3
            load.parameters["shadow_only"].bool_param = False
            await stub.RepositoryModelLoad(load)
            bad = service_pb2.RepositoryModelLoadRequest(model_name="echo")
            bad.parameters["canary"].string_param = "100,10"
            try:
                await stub.RepositoryModelLoad(bad)
            except grpc.aio.AioRpcError as exc:
                return exc.code()

    code = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert manager.calls[-1] == (
        "canary",
        None,
        {"name": "echo", "shadow_only": False, "steps": [10, 50, 100], "step_seconds": 3.0},
    )
