"""The binary's own contract: data directory, secrets, configuration, accounts."""

import os
import stat
import subprocess
import time

from conftest import BIN, Server, assert_no_panic, free_port, unique


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_first_start_layout_and_secret_permissions(workdir):
    s = Server(workdir / unique("layout")).start()
    try:
        d = s.data_dir
        assert mode(d) == 0o700
        for secret in ["ca.key", "device-ca.key", "server.key", "aws/credentials"]:
            assert mode(d / secret) == 0o600, secret
        for public in ["ca.pem", "device-ca.pem", "server.pem", "aws/config"]:
            assert (d / public).exists(), public
        config = (d / "aws" / "config").read_text()
        assert "[profile sekisho]" in config and "region = us-east-1" in config
        assert f"ca_bundle = {d / 'ca.pem'}" in config and f"https://localhost:{s.api_port}" in config
        assert s.aws("iot", "list-things")["things"] == []
        # Restarted on another port, the profile follows.
        s.stop()
        s.api_port = free_port()
        s.start()
        assert f"https://localhost:{s.api_port}" in (d / "aws" / "config").read_text()
        assert s.aws("iot", "list-things")["things"] == []
    finally:
        s.stop()


def test_default_data_directory(workdir):
    home = workdir / unique("home")
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_DATA_HOME", None)
    cp = subprocess.run([str(BIN), "account", "list"], env=env, capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert (home / ".local/share/sekisho/registry.db").exists()
    assert "default" in cp.stdout


def test_config_file_sets_ports_and_unknown_keys_are_errors(workdir):
    d = workdir / unique("cfg")
    d.mkdir()
    mqtt, api, https, s3 = free_port(), free_port(), free_port(), free_port()
    cfg = d / "sekisho.toml"
    cfg.write_text(f'data_dir = "{d / "data"}"\nbind = ["127.0.0.1"]\n[ports]\nmqtt = {mqtt}\napi = {api}\nhttps = {https}\n'
                   f's3 = {s3}\n')
    p = subprocess.Popen([str(BIN), "serve", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        for _ in range(20):
            line = p.stdout.readline()
            out += line
            if "S3 " in line:
                break
        assert f"https://localhost:{api}" in out, out
        assert f":{mqtt}" in out
        assert f"https://localhost:{s3}" in out
    finally:
        p.terminate()
        rest, _ = p.communicate(timeout=10)
    assert_no_panic(out + rest, "sekisho serve --config")
    bad = d / "bad.toml"
    bad.write_text("[ports]\nmqtt = 1\nwebsocket = 2\n")
    cp = subprocess.run([str(BIN), "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert_no_panic(cp.stderr, "sekisho serve with a bad config")
    assert cp.returncode != 0
    assert "websocket" in cp.stderr and str(bad) in cp.stderr, cp.stderr


def test_account_create_adds_a_profile(workdir):
    s = Server(workdir / unique("accounts")).start()
    try:
        created = time.monotonic()
        cp = subprocess.run([str(BIN), "account", "create", "tenant-b", "--data-dir", str(s.data_dir)],
                            capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        profile = (s.data_dir / "aws" / "config").read_text()
        assert "[profile tenant-b]" in profile
        # It points at the ports this server recorded, S3 included.
        assert profile.count(f"endpoint_url = https://localhost:{s.s3_port}\n") == 2, profile
        assert "[tenant-b]" in (s.data_dir / "aws" / "credentials").read_text()
        # The running server serves the new account within seconds, no restart; its profile
        # points at this server's control-plane port. The account is a separate namespace.
        b = s.boto(profile="tenant-b")
        served = None
        for _ in range(100):
            try:
                b.list_things()
                served = time.monotonic() - created
                break
            except Exception:
                time.sleep(0.1)
        # The server looks for new accounts every 2 s; a little more for the look itself.
        assert served is not None and served < 3.0, f"the new account was served after {served} s"
        a = s.boto()
        a.create_thing(thingName="only-in-a")
        assert [t["thingName"] for t in b.list_things()["things"]] == []
        assert s.endpoint() != s.endpoint(profile="tenant-b")
        assert s.boto("s3", profile="tenant-b").list_buckets()["Buckets"] == []
        cp = subprocess.run([str(BIN), "account", "create", "tenant-b", "--data-dir", str(s.data_dir)],
                            capture_output=True, text=True, timeout=30)
        assert_no_panic(cp.stderr, "sekisho account create (a second time)")
        assert cp.returncode != 0 and "already exists" in cp.stderr
        # And after a restart it is still there.
        s.stop()
        s.start()
        assert [t["thingName"] for t in s.boto(profile="tenant-b").list_things()["things"]] == []
    finally:
        s.stop()


def test_relative_data_dir_gives_absolute_profile_paths(workdir):
    """The profile written for `--data-dir ./x` must work from any directory."""
    cwd = workdir / unique("rel")
    cwd.mkdir()
    cp = subprocess.run([str(BIN), "account", "list", "--data-dir", "./data"], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    config = (cwd / "data" / "aws" / "config").read_text()
    assert f"ca_bundle = {cwd.resolve() / 'data' / 'ca.pem'}" in config, config
