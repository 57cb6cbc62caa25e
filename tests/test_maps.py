"""ShardedDict behaves as a dict (checked against one on random operations) and keeps
its largest copy small: no insert copies more than one shard."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from matcher.maps import SHARDS, ShardedDict

keys = st.one_of(st.integers(-5, 300), st.tuples(st.integers(0, 3), st.text(max_size=3)))
ops = st.lists(st.tuples(st.sampled_from(["set", "del", "pop", "get", "clear"]), keys,
                         st.integers()), max_size=200)


@given(ops)
@settings(max_examples=200)
def test_it_behaves_as_a_dict(script: list[tuple[str, object, int]]) -> None:
    model: dict[object, int] = {}
    sharded: ShardedDict[object, int] = ShardedDict()
    for op, key, value in script:
        if op == "set":
            model[key] = value
            sharded[key] = value
        elif op == "del":
            if key in model:
                del model[key]
                del sharded[key]
            else:
                assert key not in sharded
        elif op == "pop":
            assert sharded.pop(key, None) == model.pop(key, None)
        elif op == "get":
            assert sharded.get(key) == model.get(key)
            assert (key in sharded) == (key in model)
        else:
            model.clear()
            sharded.clear()
        assert len(sharded) == len(model)
    assert dict(sharded.items()) == model
    assert sorted(map(repr, sharded)) == sorted(map(repr, model))


def test_the_entries_spread_over_every_shard() -> None:
    """Order ids (consecutive ints) and client ids both spread out, so no shard holds a
    large share and no single copy is large."""
    ids: ShardedDict[int, int] = ShardedDict((n, n) for n in range(100_000, 300_000))
    names: ShardedDict[tuple[int, str], int] = ShardedDict(
        ((1000 + n % 67, f"run-f{n % 67}-{n}"), n) for n in range(200_000))
    for sharded in (ids, names):
        sizes = [len(shard) for shard in sharded._shards]
        assert len(sizes) == SHARDS and sum(sizes) == 200_000
        assert max(sizes) < 2 * 200_000 / SHARDS, max(sizes)


SESSION = """
import random
from matcher import protocol as wire, snapshot
from matcher.engine import Engine
rng, e = random.Random(5), Engine()
def sub(n, p, role, cmd):
    e.submit(p, role, cmd, n * 10**7)
for s in ("A-30", "A-90"):
    sub(0, 1, "admin", wire.AddSegment(segment=s, core="A", tenor_days=30))
for f in range(10, 20):
    sub(0, f, "funder", wire.SetCreditLine(core="A", amount=10**9))
for n in range(1, 6000):
    seg, r = rng.choice(["A-30", "A-90"]), rng.random()
    if r < 0.5:
        sub(n, rng.randrange(10, 20), "funder", wire.Bid(client_id=f"b{rng.randrange(900)}",
            segment=seg, rate_bps=rng.randrange(200, 260), amount=10**6, tif="day"))
    elif r < 0.7:
        sub(n, rng.randrange(10, 20), "funder", wire.Cancel(client_id=f"b{rng.randrange(900)}"))
    else:
        sub(n, 100 + rng.randrange(50), "sme", wire.Ask(client_id=f"a{rng.randrange(3000)}",
            segment=seg, amount=rng.randrange(1, 30) * 10**5))
assert len(e.finished) > 1000 and len(e.clients) > 1000
print(snapshot.state_hash(e))
"""


def test_a_snapshot_is_the_same_whatever_the_process_hash_seed() -> None:
    """The sharded maps iterate by salted hash; the canonical snapshot must not."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    hashes = {subprocess.run([sys.executable, "-c", SESSION], cwd=ROOT, check=True,
                             capture_output=True, text=True,
                             env=dict(os.environ, PYTHONHASHSEED=seed)).stdout
              for seed in ("1", "2", "3")}
    assert len(hashes) == 1 and len(hashes.pop().strip()) == 64
