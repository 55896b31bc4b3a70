"""Fuzz: YAML config and VM definitions of any shape give one ConfigError line, fast.

`load_cluster_config` and `haguard.vm.inventory.load_file` read files operators edit by
hand.  Arbitrary text and bytes, and the shipped examples mutated (a key deleted, a
value replaced by anything YAML can hold, an unknown key added, a line dropped or
cut), must either load or raise ConfigError whose one-line message starts with the
file's path; never another exception, never a hang.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haguard.config.cluster import load_cluster_config
from haguard.errors import ConfigError
from haguard.vm.inventory import load_file

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SEEDS = [ROOT / "config" / "cluster.example.yaml", ROOT / "config" / "examples" / "two-host-lab.yaml",
                 ROOT / "config" / "examples" / "fenced-ipmi.yaml"]
VM_SEEDS = [ROOT / "config" / "vms" / "example.yaml"]
LOADERS: dict[str, Callable[[Path], object]] = {"cluster": load_cluster_config, "vms": load_file}
FUZZ = settings(max_examples=200, deadline=1000,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**40), max_value=2**40)
        | st.floats(allow_nan=False) | st.text(max_size=12))
yaml_data = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="haguard-fuzz-") as d:
        yield Path(d)


def load(loader: str, path: Path, content: str | bytes) -> ConfigError | None:
    """Write and load; the ConfigError raised (checked for shape), or None if it loaded."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        LOADERS[loader](path)
    except ConfigError as exc:
        text = str(exc)
        assert "\n" not in text and "\r" not in text, text
        assert text.startswith(f"{path}:") and len(text) < 400, text
        assert exc.file == str(path)
        if exc.field:
            assert f"{exc.field}: " in text
        return exc
    return None


def seed_text(loader: str, i: int) -> str:
    seeds = CLUSTER_SEEDS if loader == "cluster" else VM_SEEDS
    return seeds[i % len(seeds)].read_text()


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a YAML document (for picking what to mutate)."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated_yaml(draw: st.DrawFn, loader: str) -> tuple[str, str, tuple[Any, ...]]:
    """A seed with one structural change: (text, what was done, the path it was done at)."""
    data = yaml.safe_load(seed_text(loader, draw(st.integers(min_value=0, max_value=2))))
    doc = copy.deepcopy(data)
    path = draw(st.sampled_from(paths(doc)))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    how = draw(st.sampled_from(["delete", "replace", "unknown-key", "wrap"]))
    if how == "unknown-key" and not isinstance(parent, dict):
        how = "wrap"
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "replace":
        parent[last] = draw(yaml_data)
    elif how == "unknown-key":
        parent["zz_" + draw(st.text(alphabet="abcxyz_", min_size=1, max_size=6))] = draw(yaml_data)
    else:
        parent[last] = [parent[last]]
    return yaml.safe_dump(doc, sort_keys=False), how, path


@pytest.mark.timeout(30)
@FUZZ
@given(st.sampled_from(sorted(LOADERS)), st.text(max_size=300))
def test_arbitrary_text(workdir: Path, loader: str, text: str) -> None:
    load(loader, workdir / "any.yaml", text)


@pytest.mark.timeout(30)
@FUZZ
@given(st.sampled_from(sorted(LOADERS)), st.binary(max_size=300))
def test_arbitrary_bytes(workdir: Path, loader: str, data: bytes) -> None:
    load(loader, workdir / "bytes.yaml", data)


@pytest.mark.timeout(30)
@FUZZ
@given(st.sampled_from(sorted(LOADERS)).flatmap(lambda name: st.tuples(st.just(name), mutated_yaml(name))))
def test_structurally_mutated_examples(workdir: Path, case: tuple[str, tuple[str, str, Any]]) -> None:
    loader, (text, how, _) = case
    exc = load(loader, workdir / "mutated.yaml", text)
    if exc is not None and how == "unknown-key":
        # Refused at the added key (an unknown field, or a bad value in a free-form map).
        assert exc.line is not None and "zz_" in (exc.field or ""), exc


@pytest.mark.timeout(30)
@FUZZ
@given(st.sampled_from(sorted(LOADERS)), st.integers(min_value=0, max_value=2), st.data())
def test_textually_mutated_examples(workdir: Path, loader: str, i: int, data: st.DataObject) -> None:
    lines = seed_text(loader, i).splitlines(keepends=True)
    how = data.draw(st.sampled_from(["drop", "duplicate", "cut", "insert", "indent"]))
    n = data.draw(st.integers(min_value=0, max_value=len(lines) - 1))
    if how == "drop":
        del lines[n]
    elif how == "duplicate":
        lines.insert(n, lines[n])
    elif how == "cut":
        lines = [*lines[:n], lines[n][:data.draw(st.integers(min_value=0, max_value=len(lines[n])))]]
    elif how == "insert":
        col = data.draw(st.integers(min_value=0, max_value=len(lines[n])))
        lines[n] = lines[n][:col] + data.draw(st.text(min_size=1, max_size=5)) + lines[n][col:]
    else:
        lines[n] = " " * data.draw(st.integers(min_value=1, max_value=3)) + lines[n]
    load(loader, workdir / "edited.yaml", "".join(lines))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize(("content", "why"), [
    ("[" * 3000 + "]" * 3000, "nested too deep"),
    ("a: " + "{b: " * 3000 + "1" + "}" * 3000, "nested too deep"),
    (b"cluster: \xff\xfe\n", "not UTF-8 text (byte 9)"),
    ("cluster: a\x00b\n", ":1: invalid YAML: control character #x0000 is not allowed"),
    ("cluster: c\nhosts: [{name: a, memory_mib: 1" + "0" * 5000 + "}]\n", "a number has too many digits"),
    ("!!python/object/apply:os.system [true]\n", ":1: invalid YAML: could not determine a constructor"),
    ("- 1\n- 2\n", ":1: Input should be a valid dictionary"),
    ("\n\n", ": file is empty"),
])
def test_known_hard_inputs(workdir: Path, loader: str, content: str | bytes, why: str) -> None:
    exc = load(loader, workdir / "hard.yaml", content)
    assert exc is not None and why in str(exc), exc


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("loader", "content", "why"), [
    ("cluster", "cluster: c\nhosts: &a [*a]\n", ":2: hosts[0]: Input should be a valid dictionary"),
    ("vms", "name: v\nmemory_mib: &a [*a]\n", ":2: memory_mib: Input should be a valid integer"),
    ("cluster", 'cluster: c\nhosts: [{name: a, address: 10.0.0.1}]\nmqtt: {urls: ["mqtt://x"]}\n'
     'key_file: /k\n"bad\\nkey": 1\n', ":5: 'bad\\nkey': unknown field"),
    ("vms", 'name: v1\nmemory_mib: 512\n"bad\\nkey": 1\n', ":3: 'bad\\nkey': unknown field"),
])
def test_self_referencing_values_and_odd_keys(workdir: Path, loader: str, content: str, why: str) -> None:
    exc = load(loader, workdir / "odd.yaml", content)
    assert exc is not None and why in str(exc), exc


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_alias_bombs_are_quick(workdir: Path, loader: str) -> None:
    # Nine-fold aliases six deep: PyYAML shares the objects, validation must not expand them.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    for key in ("cluster", "hosts", "name", "disks", "vms"):
        exc = load(loader, workdir / "bomb.yaml", "\n".join([*lines, f"{key}: *a6", ""]))
        assert exc is not None
