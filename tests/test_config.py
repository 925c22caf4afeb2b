"""Configuration: a bad value is refused with the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmft_qemu import config as cfg


def test_defaults_are_valid() -> None:
    c = cfg.from_dict({})
    assert c.vm.memory_mib == 256 and c.backup.log_port == 7400


@pytest.mark.parametrize("raw, message", [
    ({"vm": {"memory_mib": 5000}}, "vm.memory_mib = 5000: must be an integer from 64 to 4096"),
    ({"vm": {"memory_mib": True}}, "vm.memory_mib = True: must be an integer"),
    ({"vm": {"workload": "dance"}}, "vm.workload = 'dance': must be ticks, sha256:MIB"),
    ({"vm": {"memroy_mib": 1}}, "vm.memroy_mib: unknown key; allowed: name, memory_mib"),
    ({"backup": {"address": "host-b"}}, "backup.address = 'host-b': must be an IP address"),
    ({"backup": {"log_port": 0}}, "backup.log_port = 0: must be an integer from 1 to 65535"),
    ({"primary": {"run_dir": "relative"}}, "primary.run_dir = 'relative': must be an absolute"),
    ({"primary": {"run_dir": "/x"}, "backup": {"run_dir": "/x"}}, "must differ from"),
    ({"vm": {"icount_shift": 11}}, 'vm.icount_shift = 11: must be "auto" or an integer'),
    ({"chanel": {}}, "[chanel]: unknown section; allowed: vm, primary, backup, lag, channel"),
])
def test_bad_values_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.from_dict(raw, "pair.toml")
    assert message in str(err.value) and str(err.value).startswith("pair.toml: ")


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[vm\nname=")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(bad)
