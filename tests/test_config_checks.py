"""`haguard check-config` (and the agent's start) refuse what YAML and pydantic's lax mode
let through silently, each with one line naming the file, the line and the field:
duplicate keys, non-integer integers, duplicate hosts, non-finite numbers, missing fence
programs and secret files.  The shipped configurations still pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from haguard.agent.reload import reloaded
from haguard.config.cluster import ClusterConfig, load_cluster_config
from haguard.core.hostkeys import key_id, private_text, public_text

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "config" / "cluster.example.yaml", REPO / "config" / "cluster.reference.yaml",
           *sorted((REPO / "config" / "examples").glob("*.yaml"))]

BASE = """\
cluster: c1
host: a
hosts:
  - name: a
    address: 198.18.0.1
    weight: 2
  - name: b
    address: 198.18.0.2
key_file: {key}
mqtt:
  urls: ['mqtt://127.0.0.1']
timing:
  heartbeat_interval_ms: 300
vm_restart:
  window_s: 600
vm_dir: {vms}
state_dir: {state}
run_dir: {run}
metrics: {{enabled: false}}
"""

FENCE = "{kind: command, agent: /bin/true}"
HA = """\
cluster: c1
host: a
hosts:
  - name: a
    address: 198.18.0.1
    fence: {fa}
  - name: b
    address: 198.18.0.2
    fence: {fb}
  - name: c
    address: 198.18.0.3
    fence: {fc}
key_file: {key}
mqtt:
  urls: ['mqtt://127.0.0.1']
vm_dir: {vms}
state_dir: {state}
run_dir: {run}
metrics: {{enabled: false}}
ha:
  enabled: {enabled}
"""


def _dirs(tmp: Path) -> dict[str, Path]:
    (tmp / "vms").mkdir(exist_ok=True)
    key = tmp / "key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    return {"key": key, "vms": tmp / "vms", "state": tmp / "state", "run": tmp / "run" / "vms"}


def _base(tmp: Path) -> str:
    return BASE.format(**_dirs(tmp))


def _ha(tmp: Path, *, enabled: bool = True, fa: str = FENCE, fb: str = FENCE, fc: str = FENCE) -> str:
    return HA.format(**_dirs(tmp), enabled=str(enabled).lower(), fa=fa, fb=fb, fc=fc)


def _haguard(*args: str | Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "haguard", *map(str, args)], capture_output=True,
                              text=True, timeout=30, cwd=REPO, check=False)
    except subprocess.TimeoutExpired as exc:   # `run` started the agent: the file was accepted
        pytest.fail(f"haguard {args[0]} accepted the file and ran on: {exc.stderr!r}")


def _check(tmp: Path, text: str, name: str = "cluster.yaml") -> tuple[Path, subprocess.CompletedProcess[str]]:
    cfg = tmp / name
    cfg.write_text(text)
    return cfg, _haguard("check-config", "--config", cfg)


def _line(text: str, needle: str, nth: int = 1) -> int:
    """The number of the nth line of `text` holding `needle`."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    assert len(hits) >= nth, (needle, text)
    return hits[nth - 1]


def _refused(out: subprocess.CompletedProcess[str], file: Path, line: int, field: str, *words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and out.stderr.endswith("\n"), out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert f"{file}:{line}: {field}: " in out.stderr, (f"{file}:{line}: {field}: ", out.stderr)
    for word in words:
        assert word in out.stderr, (word, out.stderr)


# ---- 1. duplicate keys ------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize(("old", "new", "needle", "nth", "field"), [
    # a second top-level section: the last one used to win
    ("vm_restart:\n", "timing:\n  suspect_timeout_ms: 1000\nvm_restart:\n", "timing:", 2, "timing"),
    # a host entry naming itself twice (block style)
    ("    address: 198.18.0.2\n", "    address: 198.18.0.2\n    name: c\n", "name: c", 1, "hosts[1].name"),
    # flow style
    ("metrics: {enabled: false}", "metrics: {enabled: false, enabled: true}", "metrics:", 1,
     "metrics.enabled"),
    # nested: the same value twice is still a mistake
    ("  heartbeat_interval_ms: 300\n", "  heartbeat_interval_ms: 300\n  heartbeat_interval_ms: 300\n",
     "heartbeat_interval_ms", 2, "timing.heartbeat_interval_ms"),
    # a quoted and a plain key are the same key
    ("metrics: {enabled: false}", 'metrics: {enabled: false, "enabled": true}', "metrics:", 1,
     "metrics.enabled"),
])
def test_duplicate_keys_in_the_cluster_file(tmp_path: Path, old: str, new: str, needle: str, nth: int,
                                            field: str) -> None:
    text = _base(tmp_path).replace(old, new, 1)
    assert text != _base(tmp_path)
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, needle, nth), field, "duplicate key")


@pytest.mark.timeout(60)
def test_duplicate_keys_in_vm_files(tmp_path: Path) -> None:
    base = _base(tmp_path)
    one = "name: web\nmemory_mib: 256\nvcpus: 1\nmemory_mib: 512\n"
    (tmp_path / "vms" / "web.yaml").write_text(one)
    _, out = _check(tmp_path, base)
    _refused(out, tmp_path / "vms" / "web.yaml", 4, "memory_mib", "duplicate key")
    (tmp_path / "vms" / "web.yaml").unlink()
    many = "vms:\n  - name: v1\n    memory_mib: 256\n  - name: v2\n    memory_mib: 256\n    name: v3\n"
    (tmp_path / "vms" / "list.yaml").write_text(many)
    _, out = _check(tmp_path, base)
    _refused(out, tmp_path / "vms" / "list.yaml", 6, "vms[1].name", "duplicate key")


@pytest.mark.timeout(60)
def test_a_merge_key_override_is_not_a_duplicate(tmp_path: Path) -> None:
    text = _base(tmp_path).replace(
        "  - name: b\n    address: 198.18.0.2\n",
        "  - &b\n    name: b\n    address: 198.18.0.2\n  - <<: *b\n    name: c\n    address: 198.18.0.3\n")
    _, out = _check(tmp_path, text)
    assert out.returncode == 0 and out.stdout.startswith("ok: cluster c1, 3 hosts"), out.stderr


@pytest.mark.timeout(60)
def test_the_agent_refuses_a_duplicate_key_at_start(tmp_path: Path) -> None:
    text = _base(tmp_path).replace("vm_restart:\n", "timing:\n  suspect_timeout_ms: 1000\nvm_restart:\n", 1)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(text)
    out = _haguard("run", "--config", cfg)
    _refused(out, cfg, _line(text, "timing:", 2), "timing", "duplicate key")


# ---- 2. integers that must be integers --------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize(("old", "new", "needle", "field"), [
    ("    weight: 2\n", "    weight: true\n", "weight:", "hosts[0].weight"),
    ("    weight: 2\n", "    weight: 1.5\n", "weight:", "hosts[0].weight"),
    ("    weight: 2\n", "    weight: 2.0\n", "weight:", "hosts[0].weight"),
    ("    weight: 2\n", "    weight: '2'\n", "weight:", "hosts[0].weight"),
    ("    address: 198.18.0.2\n", "    address: 198.18.0.2\n    priority: yes\n", "priority:",
     "hosts[1].priority"),
    ("    address: 198.18.0.2\n", "    address: 198.18.0.2\n    memory_mib: 4096.0\n", "memory_mib:",
     "hosts[1].memory_mib"),
    ("  heartbeat_interval_ms: 300\n", "  heartbeat_interval_ms: 300.0\n", "heartbeat_interval_ms",
     "timing.heartbeat_interval_ms"),
    ("  urls: ['mqtt://127.0.0.1']\n", "  urls: ['mqtt://127.0.0.1']\n  keepalive_s: true\n",
     "keepalive_s", "mqtt.keepalive_s"),
    ("  window_s: 600\n", "  window_s: 600\n  max_restarts: false\n", "max_restarts",
     "vm_restart.max_restarts"),
    # floats take ints, never booleans
    ("  window_s: 600\n", "  window_s: true\n", "window_s", "vm_restart.window_s"),
])
def test_integer_fields_refuse_booleans_floats_and_strings(tmp_path: Path, old: str, new: str, needle: str,
                                                           field: str) -> None:
    text = _base(tmp_path).replace(old, new, 1)
    assert text != _base(tmp_path)
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, needle), field)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("extra", "line", "field"), [
    ("memory_mib: 512.0\n", 2, "memory_mib"),
    ("memory_mib: 512\nvcpus: true\n", 3, "vcpus"),
    ("memory_mib: 512\npriority: yes\n", 3, "priority"),
])
def test_vm_integer_fields_are_strict(tmp_path: Path, extra: str, line: int, field: str) -> None:
    vm = tmp_path / "vms" / "web.yaml"
    base = _base(tmp_path)
    vm.write_text("name: web\n" + extra)
    _, out = _check(tmp_path, base)
    _refused(out, vm, line, field)


# ---- 3. duplicate hosts -----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_duplicate_host_names_are_refused_at_the_second(tmp_path: Path) -> None:
    text = _base(tmp_path).replace("  - name: b\n", "  - name: a\n", 1)
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "name: a", 2), "hosts[1].name", "listed twice")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("first", "second"), [
    ("198.18.0.1", "198.18.0.1"),
    ("2001:db8::1", "2001:DB8:0::1"),          # the same IPv6 address, written differently
])
def test_duplicate_host_addresses_are_refused(tmp_path: Path, first: str, second: str) -> None:
    text = (_base(tmp_path).replace("address: 198.18.0.1", f"address: '{first}'", 1)
            .replace("address: 198.18.0.2", f"address: '{second}'", 1))
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "address:", 2), "hosts[1].address", "hosts[0]")


# ---- 4. non-finite numbers --------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize(("old", "new", "needle", "field"), [
    ("  window_s: 600\n", "  window_s: .inf\n", "window_s", "vm_restart.window_s"),
    ("  window_s: 600\n", "  window_s: .nan\n", "window_s", "vm_restart.window_s"),
    ("metrics: {enabled: false}\n", "metrics: {enabled: false}\nha: {shutdown_timeout_s: .inf}\n",
     "shutdown_timeout_s", "ha.shutdown_timeout_s"),
    ("metrics: {enabled: false}\n", "metrics: {enabled: false}\nalerts: {repeat_interval_s: .Inf}\n",
     "repeat_interval_s", "alerts.repeat_interval_s"),
    ("metrics: {enabled: false}\n",
     "metrics: {enabled: false}\nprobes:\n  - {name: load, file: /proc/loadavg, max_value: -.inf}\n",
     "max_value", "probes[0].max_value"),
    ("    address: 198.18.0.2\n",
     "    address: 198.18.0.2\n    fence: {kind: command, agent: /bin/true, timeout_s: .inf}\n",
     "timeout_s", "hosts[1].fence.timeout_s"),
])
def test_non_finite_numbers_are_refused(tmp_path: Path, old: str, new: str, needle: str, field: str) -> None:
    text = _base(tmp_path).replace(old, new, 1)
    assert text != _base(tmp_path)
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, needle), field, "finite")


@pytest.mark.timeout(60)
def test_the_agent_refuses_an_infinite_window_at_start(tmp_path: Path) -> None:
    text = _base(tmp_path).replace("  window_s: 600\n", "  window_s: .inf\n", 1)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(text)
    out = _haguard("run", "--config", cfg)
    _refused(out, cfg, _line(text, "window_s"), "vm_restart.window_s", "finite")


# ---- 5. fence programs and secret files -------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_missing_fence_program_on_any_host_is_refused(tmp_path: Path) -> None:
    cases = [
        ("fb", "{kind: command, agent: /nonexistent/fence_x}", "hosts[1].fence.agent"),
        ("fc", "{agent: fence_haguard_does_not_exist}", "hosts[2].fence.agent"),
        ("fb", "{kind: command, agent: '/nonexistent/python3 -m haguard.lab.fence'}", "hosts[1].fence.agent"),
    ]
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\nexit 0\n")
    plain.chmod(0o644)
    cases.append(("fa", f"{{kind: command, agent: {plain}}}", "hosts[0].fence.agent"))
    # Fencing levels: each device of the list is checked, and named by its place in it.
    cases.append(("fb", "[{kind: command, agent: /bin/true}, {kind: command, agent: /nonexistent/pdu}]",
                  "hosts[1].fence[1].agent"))
    for slot, fence, field in cases:
        text = _ha(tmp_path, **{slot: fence})
        cfg, out = _check(tmp_path, text)
        _refused(out, cfg, _line(text, fence.split(",")[-1].strip(" }'")), field, "fence")
    # A command line whose program exists: fine (the lab's fence agent, run by this Python).
    lab = f"{{kind: command, agent: '{sys.executable} -m haguard.lab.fence'}}"
    _, ok = _check(tmp_path, _ha(tmp_path, fc=lab))
    assert ok.returncode == 0, ok.stderr
    _, ok = _check(tmp_path, _ha(tmp_path, fc=f"[{lab}, {{kind: command, agent: /bin/true}}]"))
    assert ok.returncode == 0, ok.stderr
    text = _ha(tmp_path, fc="[{kind: command, agent: /bin/true}, {kind: command, timeout_s: 5}]")
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "timeout_s: 5"), "hosts[2].fence[1].agent", "required field is missing")
    text = _ha(tmp_path, fc="[]")
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "fence: []"), "hosts[2].fence", "empty list")


@pytest.mark.timeout(60)
def test_a_missing_fence_program_outside_cluster_mode_is_a_warning(tmp_path: Path) -> None:
    # Fencing runs only in cluster mode: the configuration may be prepared before the agents.
    text = _ha(tmp_path, enabled=False, fb="{kind: command, agent: /nonexistent/fence_x}")
    _, out = _check(tmp_path, text)
    assert out.returncode == 0, out.stderr
    assert "warning" in out.stderr and "hosts[1].fence.agent" in out.stderr, out.stderr


@pytest.mark.timeout(60)
def test_a_fence_device_that_skips_the_certificate_check_is_warned_about(tmp_path: Path) -> None:
    text = _ha(tmp_path, fb="{kind: command, agent: /bin/true, options: {ip: 10.0.1.2, ssl_insecure: '1'}}")
    cfg, out = _check(tmp_path, text)
    assert out.returncode == 0, out.stderr
    line = _line(text, "ssl_insecure")
    assert f"warning: {cfg}:{line}: hosts[1].fence.options.ssl_insecure: ssl_insecure skips" in out.stderr, \
        out.stderr
    secure = "{kind: command, agent: /bin/true, options: {ssl_secure: '1'}}"
    _, quiet = _check(tmp_path, _ha(tmp_path, fb=secure))
    assert quiet.returncode == 0 and "ssl_" not in quiet.stderr, quiet.stderr


@pytest.mark.timeout(60)
def test_fence_password_files_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "fence.password"
    good.write_text("secret\n")
    good.chmod(0o600)
    with_file = "{{kind: command, agent: /bin/true, password_file: {}}}"
    _, ok = _check(tmp_path, _ha(tmp_path, fb=with_file.format(good)))
    assert ok.returncode == 0, ok.stderr

    missing = tmp_path / "missing.password"
    text = _ha(tmp_path, fb=with_file.format(missing))
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "missing.password"), "hosts[1].fence.password_file", str(missing))

    loose = tmp_path / "loose.password"
    loose.write_text("secret\n")
    loose.chmod(0o644)
    text = _ha(tmp_path, fc=with_file.format(loose))
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "loose.password"), "hosts[2].fence.password_file", "chmod o-r")

    empty = tmp_path / "empty.password"
    empty.write_text("")
    empty.chmod(0o600)
    text = _ha(tmp_path, fa=with_file.format(empty))
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "empty.password"), "hosts[0].fence.password_file", "empty")


@pytest.mark.timeout(60)
def test_missing_key_and_mqtt_password_files_are_refused(tmp_path: Path) -> None:
    text = _base(tmp_path).replace(str(tmp_path / "key"), str(tmp_path / "nokey"))
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "key_file:"), "key_file", "nokey")
    text = _base(tmp_path).replace("  urls: ['mqtt://127.0.0.1']\n",
                                   f"  urls: ['mqtt://127.0.0.1']\n  password_file: {tmp_path / 'nopw'}\n")
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "password_file:"), "mqtt.password_file", "nopw")


@pytest.mark.timeout(60)
def test_a_missing_tls_file_is_a_warning(tmp_path: Path) -> None:
    tls = f"  urls: ['mqtts://127.0.0.1']\n  tls: {{ca_file: {tmp_path / 'ca.pem'}}}\n"
    text = _base(tmp_path).replace("  urls: ['mqtt://127.0.0.1']\n", tls)
    _, out = _check(tmp_path, text)
    assert out.returncode == 0 and "warning" in out.stderr and "mqtt.tls.ca_file" in out.stderr, out.stderr


# ---- valid configurations still pass ----------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_configurations_still_pass(tmp_path: Path, shipped: Path) -> None:
    """Each shipped file, pointed at this test's secrets and directories (as an operator
    would install it), with the example VM: accepted.  Fence programs named by the shipped
    files may be missing here (fence-agents is only recommended): at most a warning."""
    cfg = yaml.safe_load(shipped.read_text())
    dirs = _dirs(tmp_path)
    shutil.copy(REPO / "config" / "vms" / "example.yaml", dirs["vms"] / "web1.yaml")
    password = tmp_path / "mqtt.password"
    password.write_text("secret\n")
    password.chmod(0o600)
    cfg.update(host=cfg["hosts"][0]["name"], key_file=str(dirs["key"]), vm_dir=str(dirs["vms"]),
               run_dir=str(dirs["run"]), state_dir=str(dirs["state"]))
    if "password_file" in cfg["mqtt"]:
        cfg["mqtt"]["password_file"] = str(password)
    for host in cfg["hosts"]:
        fence = host.get("fence") or []
        for device in fence if isinstance(fence, list) else [fence]:       # fencing levels: a list
            if "password_file" in device:
                device["password_file"] = str(password)
    path = tmp_path / shipped.name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = _haguard("check-config", "--config", path)
    assert out.returncode == 0, out.stderr
    hosts = len(cfg["hosts"])
    assert out.stdout.startswith(f"ok: cluster {cfg['cluster']}, {hosts} hosts, 1 VMs"), out.stdout
    assert all("warning" in line for line in out.stderr.splitlines()), out.stderr


@pytest.mark.timeout(60)
def test_the_shipped_files_have_no_duplicate_keys_as_written() -> None:
    from haguard.config.yamlsrc import parse_yaml
    for path in [*SHIPPED, REPO / "config" / "vms" / "example.yaml"]:
        data, _ = parse_yaml(path.read_text(), str(path))
        assert isinstance(data, dict), path


@pytest.mark.timeout(60)
def test_ha_config_with_present_fence_programs_passes(tmp_path: Path) -> None:
    _, out = _check(tmp_path, _ha(tmp_path))
    assert out.returncode == 0 and out.stdout.startswith("ok: cluster c1, 3 hosts"), out.stderr
    assert os.access("/bin/true", os.X_OK)


@pytest.mark.timeout(60)
def test_a_vm_defined_twice_is_refused_at_the_second(tmp_path: Path) -> None:
    base = _base(tmp_path)
    (tmp_path / "vms" / "a.yaml").write_text("name: web\nmemory_mib: 256\n")
    (tmp_path / "vms" / "b.yaml").write_text("vms:\n  - name: db\n    memory_mib: 256\n  - name: web\n"
                                             "    memory_mib: 256\n")
    _, out = _check(tmp_path, base)
    _refused(out, tmp_path / "vms" / "b.yaml", 4, "vms[1].name", "a.yaml")
    (tmp_path / "vms" / "b.yaml").write_text("memory_mib: 256\nname: web\n")
    _, out = _check(tmp_path, base)
    _refused(out, tmp_path / "vms" / "b.yaml", 2, "name", "a.yaml")


# ---- host keys -------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_host_keys_are_made_by_keygen_and_checked(tmp_path: Path) -> None:
    key = tmp_path / "a.hostkey"
    made = _haguard("keygen", key)
    assert made.returncode == 0 and made.stdout.startswith("public_keys: ["), made
    assert key.stat().st_mode & 0o777 == 0o600
    assert _haguard("keygen", key).returncode == 2, "an existing key is never overwritten"
    public = made.stdout.split('"')[1]
    other = _haguard("keygen", tmp_path / "b.hostkey").stdout.split('"')[1]
    with_keys = _base(tmp_path).replace("    weight: 2\n", f"    weight: 2\n    public_keys: ['{public}']\n")
    cfg, ok = _check(tmp_path, with_keys + f"host_key_file: {key}\n")
    assert ok.returncode == 0, ok.stderr
    # This host's key is not the one the others know: every message of it would be refused.
    text = with_keys.replace(public, other) + f"host_key_file: {key}\n"
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "- name: a"), "hosts[0].public_keys", "is not among")
    text = with_keys.replace(public, "bm90IGEga2V5")
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "public_keys"), "hosts[0].public_keys", "9 bytes")
    # Keys listed for this host but none to sign with: the others would refuse all it says.
    cfg, out = _check(tmp_path, with_keys)
    _refused(out, cfg, _line(with_keys, "- name: a"), "hosts[0].public_keys", "no host_key_file")
    assert made.stdout.rstrip().endswith(f"# id {key_id(public)}"), made.stdout


@pytest.mark.timeout(60)
def test_json_results_and_errors_for_scripts(tmp_path: Path) -> None:
    made = _haguard("keygen", tmp_path / "k", "--json")
    key = json.loads(made.stdout)
    assert made.returncode == 0 and key["ok"] and key["key_id"] == key_id(key["public_key"]), made
    again = _haguard("keygen", tmp_path / "k", "--json")
    assert again.returncode == 2 and json.loads(again.stdout)["ok"] is False
    cfg, _ = _check(tmp_path, _base(tmp_path))
    assert json.loads(_haguard("check-config", "--config", cfg, "--json").stdout) == {
        "ok": True, "cluster": "c1", "hosts": 2, "vms": 0, "warnings": []}
    text = _base(tmp_path).replace("heartbeat_interval_ms: 300", "heartbeat_interval_ms: true")
    cfg, _ = _check(tmp_path, text)
    bad = _haguard("check-config", "--config", cfg, "--json")
    assert bad.returncode == 2
    assert {k: v for k, v in json.loads(bad.stdout).items() if k != "error"} == {
        "ok": False, "file": str(cfg), "line": _line(text, "heartbeat_interval_ms"),
        "field": "timing.heartbeat_interval_ms"}


@pytest.mark.timeout(30)
def test_a_reload_applies_host_keys_and_holds_back_what_needs_a_restart(tmp_path: Path) -> None:
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "k").write_text(private_text(k1))

    def cfg(keys: list[Ed25519PrivateKey], address: str = "198.18.0.1", key_file: str = "k") -> ClusterConfig:
        listed = ", ".join(f"'{public_text(k)}'" for k in keys)
        text = (_base(tmp_path).replace("    weight: 2\n", f"    weight: 2\n    public_keys: [{listed}]\n")
                .replace("198.18.0.1", address) + f"host_key_file: {tmp_path / key_file}\n")
        (tmp_path / "c.yaml").write_text(text)
        return load_cluster_config(tmp_path / "c.yaml")

    running = cfg([k1])
    # The new key added: taken at once, nothing waits for a restart.
    step = reloaded(cfg([k1, k2]), running, cluster_mode=True, own_new=k1, own_old=k1)
    assert step.needs_restart == [] and step.own_key is k1
    assert step.cfg.this_host().public_keys == (public_text(k1), public_text(k2))
    # The host switched to it.
    step = reloaded(cfg([k1, k2], key_file="k2"), step.cfg, cluster_mode=True, own_new=k2, own_old=k1)
    assert step.needs_restart == [] and step.own_key is k2 and step.cfg.host_key_file == tmp_path / "k2"
    # A key change mixed with a membership change waits with it: the running keys stay.
    held = reloaded(cfg([k2], address="198.18.0.9", key_file="k3"), running, cluster_mode=True,
                    own_new=k2, own_old=k1)
    assert held.needs_restart == ["hosts", "host_key_file"], held.needs_restart
    assert held.own_key is k1 and held.cfg.hosts == running.hosts
    assert held.cfg.host_key_file == running.host_key_file


@pytest.mark.timeout(60)
def test_migration_tls_credentials_are_checked(tmp_path: Path) -> None:
    creds = tmp_path / "tls"
    text = _ha(tmp_path).replace("  enabled: true\n", f"  enabled: true\n  migration_tls_dir: {creds}\n")
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "migration_tls_dir"), "ha.migration_tls_dir", "ca-cert.pem: missing")
    creds.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"):
        (creds / name).write_text("x")
        (creds / name).chmod(0o600 if name.endswith("key.pem") else 0o644)
    _, ok = _check(tmp_path, text)
    assert ok.returncode == 0, ok.stderr
    (creds / "client-key.pem").chmod(0o644)
    cfg, out = _check(tmp_path, text)
    _refused(out, cfg, _line(text, "migration_tls_dir"), "ha.migration_tls_dir", "chmod o-r")
