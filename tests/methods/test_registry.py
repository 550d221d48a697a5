"""The method registry: lookup, variants, errors, decorator and entry-point registration."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from methods import (
    AttributionMethod,
    DuplicateMethodError,
    UnknownMethodError,
    available_methods,
    create_method,
    get_method,
)
from methods.registry import (
    _BUILTINS,
    REGISTRY,
    MethodEntry,
    MethodRegistry,
    default_dampings,
    methods_in_table_order,
    register_method,
)


def test_builtin_names_are_listed():
    names = available_methods()
    for expected in [
        "kfac",
        "kfac-reduce",
        "kfac-empirical",
        "trak",
        "dtrak",
        "das",
        "clip",
        "retrain",
        "random",
        "pixel",
        "pixel-l2",
        "grad-dot",
        "ekfac",
    ]:
        assert expected in names


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(UnknownMethodError) as info:
        get_method("kfca")
    message = str(info.value)
    assert "'kfac'" in message  # the closest match
    assert "trak" in message and "random" in message  # the known names


def test_import_of_registry_imports_no_method_module():
    code = (
        "import sys, methods; methods.available_methods(); "
        "print(sorted(m for m in sys.modules if m.startswith('methods.') or m == 'open_clip'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(out.stdout.strip())
    assert "open_clip" not in loaded
    assert not {"methods.kfac", "methods.trak", "methods.clip"} & set(loaded)


@dataclass(frozen=True)
class _Cfg:
    """Test config.

    Attributes:
        scale: multiplies the scores.
    """

    scale: float = 1.0


class _Constant(AttributionMethod):
    """Scores every pair with ``scale``."""

    Config = _Cfg

    def score(self, ctx):
        return np.full((ctx.n_queries, ctx.n_train), self.config.scale)


def test_variant_defaults_and_overrides():
    registry = MethodRegistry(
        (MethodEntry("const", _Constant), MethodEntry("const2", _Constant, {"scale": 2.0}))
    )
    assert registry.get("const").build().config.scale == 1.0
    assert registry.get("const2").build().config.scale == 2.0
    assert registry.get("const2").build(scale=3.0).config.scale == 3.0
    with pytest.raises(ValueError, match="no option"):
        registry.get("const").build(bogus=1)


def test_duplicate_name_raises():
    registry = MethodRegistry((MethodEntry("const", _Constant),))
    with pytest.raises(DuplicateMethodError, match="already registered"):
        registry.add(MethodEntry("const", _Constant))


def test_decorator_registration_round_trip():
    from methods.registry import REGISTRY

    @register_method("test-decorated-constant", scale=5.0)
    class Decorated(_Constant):
        """A decorated constant method."""

    try:
        assert "test-decorated-constant" in available_methods()
        assert create_method("test-decorated-constant").config.scale == 5.0
        with pytest.raises(DuplicateMethodError):
            register_method("test-decorated-constant")(Decorated)
    finally:
        REGISTRY.remove("test-decorated-constant")


def test_entry_point_plugin_is_registered():
    entry = get_method("pixel-distance")
    assert entry.origin.startswith("entry-point")
    assert entry.load().__name__ == "PixelDistance"


def test_bad_target_gives_clear_error():
    entry = MethodEntry("broken", "methods.does_not_exist:Nope", origin="entry-point (x)")
    with pytest.raises(ImportError, match="cannot be imported"):
        entry.load()
    with pytest.raises(TypeError, match="AttributionMethod subclass"):
        MethodEntry("notamethod", "builtins:dict").load()


def test_cli_lists_methods():
    out = subprocess.run(
        [sys.executable, "-m", "methods", "--list"], capture_output=True, text=True, check=True
    )
    assert "kfac-reduce" in out.stdout and "kfac_approx='reduce'" in out.stdout


# ---------------------------------------------------------------- table metadata


def test_every_builtin_has_a_display_name():
    builtins = [entry for entry in REGISTRY.ordered() if entry.origin == "builtin"]
    assert [entry.name for entry in builtins] == [entry.name for entry in _BUILTINS]
    for entry in builtins:
        assert isinstance(entry.display_name, str) and entry.display_name.strip()
    labels = [entry.display_name for entry in builtins]
    assert len(set(labels)) == len(labels)  # one label per row of a table
    assert get_method("kfac").display_name == "K-FAC influence"
    assert MethodEntry("x", _Constant).display_name == "x"  # default: the name


def test_table_order_is_total_and_stable():
    order = methods_in_table_order()
    assert sorted(order) == available_methods()  # every name exactly once
    assert order == methods_in_table_order()  # stable
    assert order[: len(_BUILTINS)] == [entry.name for entry in _BUILTINS]  # built-ins first
    positions = [get_method(name).order for name in order[: len(_BUILTINS)]]
    assert positions == list(range(len(_BUILTINS)))
    assert order.index("random") < order.index("trak") < order.index("kfac")
    assert order[len(_BUILTINS) - 1] == "retrain"


@pytest.mark.parametrize("name", ["kfac", "kfac-reduce", "ekfac", "grad-dot", "kfac-mloss", "trak"])
def test_default_damping_is_the_configs(name):
    entry = get_method(name)
    cls = entry.load()
    expected = cls.Config(**entry.defaults).damping
    assert entry.default_damping == expected
    assert default_dampings([name]) == {name: expected}


def test_default_damping_values_and_methods_without_damping():
    assert get_method("kfac").default_damping == 1e-8
    assert get_method("ekfac").default_damping == 1e-8
    assert get_method("grad-dot").default_damping == 1e-8
    assert get_method("kfac-mloss").default_damping == 1e-8
    assert get_method("trak").default_damping == 1e-9
    assert get_method("dtrak").default_damping == 1e-9
    assert get_method("random").default_damping is None
    assert get_method("retrain").default_damping is None
    dampings = default_dampings(["kfac", "random", "noise-ceiling", "not-installed"])
    assert dampings == {"kfac": 1e-8}  # no damping or not registered: left out
    variant = MethodEntry("c", _Constant, {"scale": 2.0})
    assert variant.default_damping is None


def test_registered_plugin_comes_after_builtins_with_its_name_as_label():
    @register_method("test-late-plugin")
    class Late(_Constant):
        """A plugin."""

    @register_method("aaa-test-labelled-plugin")
    class Labelled(_Constant):
        """A plugin declaring its label."""

        display_name = "Labelled plugin"

    try:
        order = methods_in_table_order()
        builtins = {entry.name for entry in _BUILTINS}
        last_builtin = max(order.index(name) for name in builtins)
        assert order.index("test-late-plugin") > last_builtin
        assert order.index("aaa-test-labelled-plugin") > last_builtin
        assert get_method("test-late-plugin").display_name == "test-late-plugin"
        assert get_method("aaa-test-labelled-plugin").display_name == "Labelled plugin"
        assert get_method("test-late-plugin").order is None
    finally:
        REGISTRY.remove("test-late-plugin")
        REGISTRY.remove("aaa-test-labelled-plugin")
