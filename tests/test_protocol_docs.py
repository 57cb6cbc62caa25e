"""docs/protocol.md, docs/asyncapi.yaml and matcher.protocol describe the same API.

The AsyncAPI document is generated from the types (tools/asyncapi.py): the committed file
must be exactly what the generator produces now. The prose reference must name every
message of both unions (and no other), every field of each, and every code the gateway
and the engine can send.
"""

from __future__ import annotations

import importlib.util
import json
import re
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

from matcher import protocol as wire

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
ASYNCAPI = ROOT / "docs" / "asyncapi.yaml"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asyncapi_tool", ROOT / "tools" / "asyncapi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tags(union: Any) -> dict[str, type]:
    return {cls.__struct_config__.tag: cls for cls in typing.get_args(union)}


def section(text: str, title: str) -> str:
    """The body of `## title`, up to the next second-level heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m is not None, f"docs/protocol.md has no section '## {title}'"
    return m.group(1)


def messages(body: str) -> dict[str, str]:
    """`### \\`name\\`` headings of a section, each with its text."""
    parts = re.split(r"^### `([a-z_]+)`\n", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


DOC = PROTOCOL_MD.read_text()
CLIENT_DOC = messages(section(DOC, "Client to server"))
SERVER_DOC = messages(section(DOC, "Server to client"))


def test_committed_asyncapi_document_is_what_the_generator_makes() -> None:
    assert ASYNCAPI.read_text() == generator().render(), \
        "docs/asyncapi.yaml is out of date: run .venv/bin/python tools/asyncapi.py"


def test_asyncapi_document_has_a_message_for_every_struct_of_both_unions() -> None:
    doc = json.loads(ASYNCAPI.read_text())       # JSON is YAML
    assert doc["asyncapi"].startswith("3.")
    assert doc["channels"]["ws"]["address"] == "/ws"
    ops = doc["operations"]
    for op, union in (("receiveClientMessage", wire.ClientMessage),
                      ("sendEvent", wire.Event)):
        names = [ref["$ref"].rsplit("/", 1)[1] for ref in ops[op]["messages"]]
        assert names == [cls.__name__ for cls in typing.get_args(union)]
        for cls in typing.get_args(union):
            message = doc["components"]["messages"][cls.__name__]
            assert message["name"] == cls.__struct_config__.tag
            schema = doc["components"]["schemas"][cls.__name__]
            assert schema["properties"]["type"] == {"enum": [cls.__struct_config__.tag]}
            assert set(schema["properties"]) == {"type", *cls.__struct_fields__}


def test_asyncapi_payload_schemas_are_msgspecs_own() -> None:
    """What clients send: msgspec's schemas as they are. What the server sends: the same,
    with every field required, since the encoder writes each (found in an audit: a
    client generated from the document typed `order_id`, `path` and more as optional)."""
    classes = [*typing.get_args(wire.ClientMessage), *typing.get_args(wire.Event)]
    _, own = msgspec.json.schema_components(
        classes, ref_template="#/components/schemas/{name}")
    got = json.loads(ASYNCAPI.read_text())["components"]["schemas"]
    assert set(got) == set(own)
    server = generator().reachable(own, [c.__name__ for c in typing.get_args(wire.Event)])
    for name, schema in own.items():
        if name not in server:
            assert got[name] == schema, name
            continue
        rest = {k: v for k, v in got[name].items() if k not in ("required", "minItems")}
        assert rest == {k: v for k, v in schema.items() if k not in ("required", "minItems")}
        if "properties" in schema:
            assert got[name]["required"] == list(schema["properties"]), name
        else:
            assert got[name]["minItems"] == len(schema["prefixItems"]), name
    accepted = wire.Accepted(client_id="b", seq=1, order_id=1)   # defaults left as they are
    assert set(msgspec.json.decode(wire.json_encoder.encode(accepted))) == \
        set(got["Accepted"]["required"])                         # ... and written all the same


def test_protocol_md_documents_exactly_the_client_messages() -> None:
    assert sorted(CLIENT_DOC) == sorted(tags(wire.ClientMessage))


def test_protocol_md_documents_exactly_the_server_messages() -> None:
    assert sorted(SERVER_DOC) == sorted(tags(wire.Event))


@pytest.mark.parametrize(("direction", "union"), [("client", wire.ClientMessage),
                                                   ("server", wire.Event)])
def test_protocol_md_names_every_field_of_every_message(direction: str, union: Any) -> None:
    docs = CLIENT_DOC if direction == "client" else SERVER_DOC
    missing = [f"{name}.{field}" for name, cls in tags(union).items()
               for field in cls.__struct_fields__ if f"`{field}`" not in docs.get(name, "")]
    assert missing == []


def test_protocol_md_examples_are_valid_client_messages() -> None:
    for name, text in CLIENT_DOC.items():
        examples = re.findall(r"```json\n(.*?)```", text, re.S)
        assert examples, f"no JSON example for {name}"
        for example in examples:
            msg = wire.json_decoder.decode(example)
            assert msg.__struct_config__.tag == name


def test_protocol_md_examples_of_server_messages_fit_their_types() -> None:
    for name, text in SERVER_DOC.items():
        examples = re.findall(r"```json\n(.*?)```", text, re.S)
        assert examples, f"no JSON example for {name}"
        cls = tags(wire.Event)[name]
        for example in examples:
            data = json.loads(example)
            assert data["type"] == name
            assert set(data) == {"type", *cls.__struct_fields__}, name
            msgspec.json.decode(example, type=cls)


def source_codes() -> set[str]:
    """Every code string the engine, the book and the gateway can put in a reply."""
    codes: set[str] = set()
    choice = r'code = "([a-z_]+)" if .* else "([a-z_]+)"'     # code = "a" if ... else "b"
    engine = (ROOT / "matcher" / "engine.py").read_text()
    codes |= set(re.findall(r'Reject\(\s*"([a-z_]+)"', engine))
    codes |= {c for pair in re.findall(choice, engine) for c in pair}
    core = (ROOT / "matcher" / "_core.pyx").read_text()
    codes |= set(re.findall(r'OrderError\(\s*\w+,\s*"([a-z_]+)"', core))
    codes |= set(re.findall(r'OrderError\(\s*"[a-z_]+",\s*"([a-z_]+)"', core))
    for path in ("service/gateway.py", "service/app.py"):
        text = (ROOT / path).read_text()
        codes |= set(re.findall(r'code="([a-z_]+)"', text))
        codes |= {c for pair in re.findall(choice, text) for c in pair}
        codes |= set(re.findall(r'_json_error\(\d+, "([a-z_]+)"', text))
    codes.discard("")
    return codes


def test_protocol_md_lists_every_error_and_reject_code() -> None:
    codes = source_codes()
    # The scan must find the codes it is meant to find, or it proves nothing.
    assert {"forbidden", "unknown_order", "not_resting", "out_of_range", "not_int",
            "rate_limited", "unavailable", "malformed", "invalid",
            "already_authenticated"} <= codes
    listed = set(re.findall(r"^\| `([a-z_]+)`", section(DOC, "Codes"), re.M)) | {
        c for row in re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)+) \|", section(DOC, "Codes"),
                                 re.M) for c in re.findall(r"`([a-z_]+)`", row)}
    assert sorted(codes - listed) == []


def test_protocol_md_lists_every_done_reason_and_close_code() -> None:
    codes = section(DOC, "Codes")
    reasons = typing.get_args(wire.DoneReason)
    assert [r for r in reasons if f"| `{r}` |" not in codes] == []
    gateway = (ROOT / "service" / "gateway.py").read_text()
    close_codes = set(re.findall(r"^CLOSE_\w+ = (\d+)", gateway, re.M)) | {"1009"}
    assert {"4401", "4408", "1001"} <= close_codes
    assert [c for c in sorted(close_codes) if f"| {c} |" not in codes] == []
