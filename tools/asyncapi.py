"""Generate docs/asyncapi.yaml, the AsyncAPI 3.0 description of the WebSocket API.

Everything in it comes from `matcher.protocol`: one message per Struct of the
`ClientMessage` union (what the server receives) and of the `Event` union (what it sends),
their payload schemas from `msgspec.json.schema_components`. The document is written as
JSON, which is valid YAML, so no YAML library is needed.

    .venv/bin/python tools/asyncapi.py           # rewrite docs/asyncapi.yaml
    .venv/bin/python tools/asyncapi.py --check   # exit 1 if it is out of date

tests/test_protocol_docs.py checks that the committed file equals what this produces.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from matcher import protocol as wire  # noqa: E402

OUTPUT = ROOT / "docs" / "asyncapi.yaml"
SCHEMAS = "#/components/schemas/{name}"
CHANNEL = "ws"

DESCRIPTION = """\
The WebSocket API of the matcher gateway: funders bid annual rates (basis points) for
SMEs' financing asks (integer fen); the lowest rate wins and every loan is made at the
winning funder's own rate. One connection carries commands, quotes and subscriptions;
every message is one JSON object tagged by `type`, in a text frame (the server reads a
binary frame the same way). The server writes every field of what it sends.

Authenticate with `Authorization: Bearer <key>` on the upgrade request, or with an `auth`
message as the first frame. Unauthenticated connections are closed with 4401. Close
codes: 1001 server shutting down, 1009 frame over the size limit, 4401 unauthorized,
4408 slow consumer (outbox full), 4429 too many connections for the key.

Replies to an accepted command (`accepted`, then its `fill`s, each order's `done` after
the fill that ends it) are released only after the journal write that holds the
command. A `rejected` waits for the commands accepted before it, except flow control
(`rate_limited`, `unavailable`), which is immediate; errors, quotes and status answers
are immediate and may overtake pending acknowledgements. `book` updates are coalesced
(every changed segment's on one tick, at least 50 ms apart) and show only journaled
commands. docs/protocol.md is the prose reference."""


def tag(cls: type[msgspec.Struct]) -> str:
    """The `type` value of a message."""
    value = cls.__struct_config__.tag
    assert isinstance(value, str), cls
    return value


def members(union: Any) -> list[type[msgspec.Struct]]:
    return list(typing.get_args(union))


def summary(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ") if doc else tag(cls)


def version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def reachable(schemas: dict[str, Any], roots: list[str]) -> set[str]:
    """The components `roots` are made of, themselves included."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _refs(schemas[name])
    return seen


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [r for k, v in node.items()
                for r in ([v.rsplit("/", 1)[1]] if k == "$ref" else _refs(v))]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def as_sent(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema of what the server sends: msgspec's describe what a decoder takes, where a
    field with a default may be left out, but the gateway's encoder writes every field,
    so each is required (a client generated from the document need not test for one)."""
    out = dict(schema)
    if "properties" in out:
        out["required"] = list(out["properties"])
    if "prefixItems" in out:                    # an array-like struct: every item
        out["minItems"] = len(out["prefixItems"])
    return out


def build() -> dict[str, Any]:
    """The AsyncAPI document as a dict, in a fixed order."""
    received = members(wire.ClientMessage)      # client -> server
    sent = members(wire.Event)                  # server -> client
    names = [cls.__name__ for cls in received + sent]
    assert len(set(names)) == len(names), "two message Structs share a name"
    _, schemas = msgspec.json.schema_components(received + sent, ref_template=SCHEMAS)
    server = reachable(schemas, [cls.__name__ for cls in sent])
    assert not server & reachable(schemas, [cls.__name__ for cls in received]), \
        "a component both sides use would need two schemas"
    schemas = {name: as_sent(schema) if name in server else schema
               for name, schema in schemas.items()}

    def message(cls: type[msgspec.Struct], direction: str) -> dict[str, Any]:
        return {
            "name": tag(cls),
            "title": f"{tag(cls)} ({direction})",
            "summary": summary(cls),
            "contentType": "application/json",
            "payload": {"$ref": SCHEMAS.format(name=cls.__name__)},
        }

    def refs(classes: list[type[msgspec.Struct]]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{CHANNEL}/messages/{cls.__name__}"} for cls in classes]

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "matcher WebSocket API",
            "version": version(),
            "description": DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:8080",
                "protocol": "ws",
                "description": "`matcher serve` with the packaged demo configuration",
                "security": [{"$ref": "#/components/securitySchemes/bearer"}],
            },
        },
        "channels": {
            CHANNEL: {
                "address": "/ws",
                "title": "The gateway's one WebSocket endpoint",
                "messages": {cls.__name__: {"$ref": f"#/components/messages/{cls.__name__}"}
                             for cls in received + sent},
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "headers": {
                            "type": "object",
                            "properties": {
                                "Authorization": {
                                    "type": "string",
                                    "description": "`Bearer <API key>`; without it, the "
                                                   "first message must be `auth`",
                                },
                            },
                        },
                        "bindingVersion": "0.1.0",
                    },
                },
            },
        },
        "operations": {
            "receiveClientMessage": {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{CHANNEL}"},
                "title": "Client to server",
                "summary": "Commands (journaled), quotes, status, auth and subscriptions.",
                "messages": refs(received),
            },
            "sendEvent": {
                "action": "send",
                "channel": {"$ref": f"#/channels/{CHANNEL}"},
                "title": "Server to client",
                "summary": "Replies, fills, book updates and errors.",
                "messages": refs(sent),
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A participant's API key; the role it signs in as "
                                   "(funder, sme, platform, admin) decides what it may send.",
                },
            },
            "messages": {
                **{cls.__name__: message(cls, "client to server") for cls in received},
                **{cls.__name__: message(cls, "server to client") for cls in sent},
            },
            "schemas": {name: schemas[name] for name in sorted(schemas)},
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run tools/asyncapi.py",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
