"""Environment variables: one parser (``mythos_kernels._env``), every reader using it, the table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mythos_kernels as K
from mythos_kernels import _env

ROOT = Path(__file__).resolve().parent.parent
SWITCHES = ("MYTHOS_CPU_DECODE_PLAN", "MYTHOS_CPU_FAST_MULTINOMIAL", "MYTHOS_CPU_ONEDNN",
            "MYTHOS_CPU_WEIGHT_COPIES")
ON = ("1", "true", "TRUE", " on ", "On", "yes", "YES")
OFF = ("0", "false", "False", "off", " OFF", "no", "No")
BAD_SWITCH = ("2", "-1", "maybe", "disable", "0.0", "truee", "y")


def test_env_flag_parses_switches(monkeypatch):
    for value in ON:
        monkeypatch.setenv("MYTHOS_X", value)
        assert _env.env_flag("MYTHOS_X", False) is True, value
    for value in OFF:
        monkeypatch.setenv("MYTHOS_X", value)
        assert _env.env_flag("MYTHOS_X", True) is False, value
    for value in ("", "  "):
        monkeypatch.setenv("MYTHOS_X", value)
        assert _env.env_flag("MYTHOS_X", True) is True and _env.env_flag("MYTHOS_X", False) is False
    monkeypatch.delenv("MYTHOS_X")
    assert _env.env_flag("MYTHOS_X", True) is True
    for value in BAD_SWITCH:
        monkeypatch.setenv("MYTHOS_X", value)
        with pytest.raises(ValueError, match=r"MYTHOS_X must be 1/0, true/false, on/off or yes/no"):
            _env.env_flag("MYTHOS_X", True)


def test_env_int_and_env_choice(monkeypatch):
    for value, want in (("0", 0), (" 1 ", 1), ("", 0), ("+1", 1)):
        monkeypatch.setenv("MYTHOS_X", value)
        assert _env.env_int("MYTHOS_X", 0, 0, 1) == want
    for value in ("2", "-1", "1.0", "one", "0x1", "1_0"):
        monkeypatch.setenv("MYTHOS_X", value)
        with pytest.raises(ValueError, match=r"MYTHOS_X must be 0 or 1, got"):
            _env.env_int("MYTHOS_X", 0, 0, 1)
    monkeypatch.setenv("MYTHOS_X", "9")
    with pytest.raises(ValueError, match=r"MYTHOS_X must be an integer in \[0, 8\]"):
        _env.env_int("MYTHOS_X", 0, 0, 8)
    for value, want in ((" Triton ", "triton"), ("REFERENCE", "reference"), ("", "auto")):
        monkeypatch.setenv("MYTHOS_X", value)
        assert _env.env_choice("MYTHOS_X", ("auto", "triton", "reference"), "auto") == want
    monkeypatch.setenv("MYTHOS_X", "cuda")
    with pytest.raises(ValueError, match=r"MYTHOS_X must be one of \('auto', 'triton'"):
        _env.env_choice("MYTHOS_X", ("auto", "triton", "reference"), "auto")


def _onednn_switch() -> bool:
    """``_onednn_ok`` on inputs that pass every other condition (the switch decides)."""
    from mythos_kernels.cpu import linear

    x = torch.randn(linear.SPLIT_ROWS + 1, 256, device="cpu")
    w = torch.randn(linear.ONEDNN_MIN_WEIGHT // 256, 256, device="cpu")
    with torch.no_grad():
        return linear._onednn_ok(x, w)


def _readers():
    import mythos.decode
    import mythos.sampling

    return {"MYTHOS_CPU_DECODE_PLAN": mythos.decode.enabled,
            "MYTHOS_CPU_FAST_MULTINOMIAL": mythos.sampling.enabled,
            "MYTHOS_CPU_ONEDNN": _onednn_switch,
            "MYTHOS_CPU_WEIGHT_COPIES": K.weight_copies_enabled}


@pytest.mark.parametrize("name", SWITCHES)
def test_each_switch_reader(monkeypatch, name):
    """Each switch: on by default, ``false``/``off`` turn it off (not on), bad values raise."""
    from mythos_kernels.cpu import linear

    read = _readers()[name]
    on = linear.onednn_available() if name == "MYTHOS_CPU_ONEDNN" else True
    monkeypatch.delenv(name, raising=False)
    assert read() is on
    for value in ("true", "ON", "1"):
        monkeypatch.setenv(name, value)
        assert read() is on, value
    for value in ("false", "off", "0", "no"):
        monkeypatch.setenv(name, value)
        assert read() is False, value
    for value in ("2", "nope"):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            read()


def test_decode_plan_off_says_why(monkeypatch):
    from conftest import tiny_kwargs

    import mythos
    from mythos.decode import why_not

    with torch.device("cpu"):
        m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla"))).eval()
    ids = torch.zeros(1, 1, dtype=torch.long, device="cpu")
    monkeypatch.setenv("MYTHOS_CPU_DECODE_PLAN", "false")
    assert why_not(m, ids) == "MYTHOS_CPU_DECODE_PLAN is off"


def test_halt_lag(monkeypatch):
    for value, want in (("0", 0), ("1", 1), (" 1", 1), ("", 0)):
        monkeypatch.setenv("MYTHOS_HALT_LAG", value)
        assert K.HaltCheck("cpu").lag == want
    for value in ("2", "true", "1.5", "-1"):
        monkeypatch.setenv("MYTHOS_HALT_LAG", value)
        with pytest.raises(ValueError, match="MYTHOS_HALT_LAG must be 0 or 1"):
            K.HaltCheck("cpu")
    assert K.HaltCheck("cpu", lag=0).lag == 0   # an explicit lag does not read the variable


def test_backend_variable(monkeypatch):
    for value, want in ((" Reference ", "reference"), ("TRITON", "triton"), ("", "auto")):
        monkeypatch.setenv("MYTHOS_BACKEND", value)
        assert K.get_backend() == want
    monkeypatch.setenv("MYTHOS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MYTHOS_BACKEND must be one of"):
        K.get_backend()
    with K.use_backend("reference"):          # a block does not read the variable
        assert K.get_backend() == "reference"


def test_backend_names_from_python():
    assert K.use_backend(" Reference ") is not None
    with pytest.raises(TypeError, match=r"use_backend\(name\) must be a str"):
        with K.use_backend(None):
            pass
    with pytest.raises(ValueError, match=r"set_backend\(name\) must be one of"):
        K.set_backend("cuda")
    with pytest.raises(TypeError, match=r"set_backend\(name\) must be a str"):
        K.set_backend(1)


def test_free_text_variables(monkeypatch, tmp_path):
    from bench import ceilings, devinfo

    monkeypatch.setenv("MYTHOS_CACHE_DIR", str(tmp_path))
    assert ceilings.cache_path() == tmp_path / "ceilings.json"
    monkeypatch.setenv("MYTHOS_CACHE_DIR", "")
    assert ceilings.cache_path() == Path.home() / ".cache" / "mythos" / "ceilings.json"
    monkeypatch.setenv("MYTHOS_COMMIT", "abc123 custom")
    assert devinfo.git_commit.__wrapped__() == "abc123 custom"


def test_triton_interpret_read_by_tritons_rule(monkeypatch):
    for value, want in (("1", True), ("true", True), ("Y", True), ("0", False), ("false", False),
                        ("", False), ("off", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert K.interpreter_active() is want, value


@pytest.mark.parametrize("name, bad", [("MYTHOS_BACKEND", "gpu"), ("MYTHOS_CPU_DECODE_PLAN", "2"),
                                       ("MYTHOS_CPU_FAST_MULTINOMIAL", "x"),
                                       ("MYTHOS_CPU_ONEDNN", "maybe"),
                                       ("MYTHOS_CPU_WEIGHT_COPIES", "-"), ("MYTHOS_HALT_LAG", "3")])
def test_bad_variable_fails_before_any_compute(monkeypatch, name, bad):
    """check_environment names the variable; forward and generate raise before touching the
    cache or running an op."""
    from conftest import tiny_kwargs

    import mythos

    with torch.device("cpu"):
        m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla"))).eval()
    ids = torch.randint(0, 97, (1, 4), device="cpu")
    K.check_environment()
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=name):
        K.check_environment()
    K.reset_dispatch_counts()
    cache: dict = {}
    with pytest.raises(ValueError, match=name):
        m(ids, n_loops=2, kv_cache=cache)
    with pytest.raises(ValueError, match=name):
        m.generate(ids, max_new_tokens=2, n_loops=2)
    assert cache == {} and K.dispatch_counts() == {}


def test_every_variable_is_in_the_table():
    """Every MYTHOS_* name the package, bench and tools mention is parsed by check_environment
    and listed in the module docstring."""
    names = set()
    for folder in ("mythos", "mythos_kernels", "bench", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"\bMYTHOS_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    names.discard("MYTHOS_TEST_DEVICE")   # the test suite's own, named in the docstring
    assert names and names <= set(_env.VARIABLES), sorted(names - set(_env.VARIABLES))
    for name in _env.VARIABLES + ("MYTHOS_TEST_DEVICE",):
        assert f"``{name}``" in _env.__doc__, name
