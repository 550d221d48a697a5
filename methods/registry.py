"""A small typed registry of attribution methods.

Three ways in, one namespace:
- built-ins, listed below as ``"module:Class"`` strings and imported on first use (lazy);
- ``@register_method("name")`` on a class (scripts, tests, notebooks);
- the entry-point group ``diffusion_attribution.methods`` of installed packages, whose entries
  name a class (``my_pkg.method:MyMethod``): ``pip install my-plugin`` and it is listed.

A name may carry config defaults that make it a variant (``kfac-reduce`` is ``kfac`` with
``kfac_approx="reduce"``), so an ablation is a list of registry names.

Each entry also holds what tables and figures show: its display name, its place in the table
order (built-ins in the order of ``_BUILTINS``, every other registration after them, by name) and
its default damping, read from the method's ``Config`` (never repeated by hand).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from methods.base import AttributionMethod

ENTRY_POINT_GROUP = "diffusion_attribution.methods"


class UnknownMethodError(LookupError):
    """An unknown method name; the message lists the known names and the closest match."""


class DuplicateMethodError(ValueError):
    """Two registrations under one name."""


@dataclass(frozen=True)
class MethodEntry:
    """One registry name.

    Attributes:
        name: the registry name (``--method NAME``).
        target: the method class, or ``"module:Class"`` to import on first use.
        defaults: config field values that define this variant (overridable by the user).
        summary: one line for ``--list``.
        origin: ``"builtin"``, ``"decorator"`` or ``"entry-point (<distribution>)"``.
        display_name: the label in tables and figures; empty: the class's ``display_name``
            attribute when ``target`` is a class that declares one, else ``name``.
        order: place in tables and figures; the registry numbers its built-ins by position,
            None (every other registration) sorts after all of them, by name.
        similarity: a model-free similarity baseline (``pixel``, ``pixel-l2``, ``clip``): the
            LDS tables pair every method with the best of these in the run
            (:func:`similarity_baselines`).
    """

    name: str
    target: type[AttributionMethod] | str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    origin: str = "builtin"
    display_name: str = ""
    order: int | None = None
    similarity: bool = False

    def __post_init__(self) -> None:
        if not self.display_name:
            declared = getattr(self.target, "display_name", None)
            label = declared if isinstance(declared, str) and declared else self.name
            object.__setattr__(self, "display_name", label)

    @property
    def sort_key(self) -> tuple[bool, int, str]:
        """Key of the table order: numbered entries by ``order``, then the others by name."""
        return (self.order is None, 0 if self.order is None else self.order, self.name)

    @property
    def needs_query_trajectories(self) -> bool:
        """Whether the method reads the queries' sampling trajectories (imports its module)."""
        return bool(self.load().needs_query_trajectories)

    @property
    def default_damping(self) -> float | None:
        """The damping this name runs with unless told otherwise.

        That is the ``damping`` field of its Config with ``defaults`` applied; None when the
        method has no damping option (imports the method's module).
        """
        damping = getattr(self.config(), "damping", None)
        return None if damping is None else float(damping)

    def load(self) -> type[AttributionMethod]:
        """The method class (imports its module if needed)."""
        target = self.target
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            try:
                target = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as error:
                raise ImportError(
                    f"method {self.name!r} ({self.origin}) points at {self.target!r}, which "
                    f"cannot be imported: {error}"
                ) from error
        if not (isinstance(target, type) and issubclass(target, AttributionMethod)):
            raise TypeError(
                f"method {self.name!r} ({self.origin}) must be an AttributionMethod subclass, "
                f"got {target!r}"
            )
        return target

    def config(self, **overrides: Any) -> Any:
        """The config: the class defaults, then ``defaults``, then ``overrides``."""
        cls = self.load()
        known = {f.name for f in fields(cls.Config)}
        values = {**self.defaults, **overrides}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option(s) {unknown}; its options are {sorted(known)}"
            )
        return replace(cls.Config(), **values)

    def build(self, **overrides: Any) -> AttributionMethod:
        """An instance whose config is the class defaults, then ``defaults``, then ``overrides``."""
        return self.load()(self.config(**overrides))


# in table order: baselines, TRAK, unlearning, TracIn, K-FAC, the oracle
_BUILTINS: tuple[MethodEntry, ...] = (
    MethodEntry("random", "methods.baselines:RandomScores", {}, "seeded random scores"),
    MethodEntry(
        "pixel",
        "methods.baselines:PixelCosine",
        {},
        "cosine similarity in pixel space",
        display_name="pixel cosine",
        similarity=True,
    ),
    MethodEntry(
        "pixel-l2",
        "methods.baselines:PixelL2",
        {},
        "minus the L2 distance in pixel space (nearest neighbour)",
        display_name="pixel L2",
        similarity=True,
    ),
    MethodEntry(
        "clip",
        "methods.clip:CLIPCosine",
        {},
        "CLIP embedding cosine similarity",
        display_name="CLIP cosine",
        similarity=True,
    ),
    MethodEntry(
        "trak", "methods.trak:TRAK", {}, "TRAK: projected gradients, GGN^loss", display_name="TRAK"
    ),
    MethodEntry(
        "dtrak",
        "methods.trak:TRAK",
        {"output_function": "square-norm"},
        "D-TRAK: TRAK with the square norm ||eps_theta||^2 substituted",
        display_name="D-TRAK",
    ),
    MethodEntry(
        "trak-ensemble",
        "methods.trak_ensemble:TRAKEnsemble",
        {},
        "TRAK averaged over models trained on random halves (n_models, default 4)",
        display_name="TRAK ensemble",
    ),
    MethodEntry(
        "dtrak-ensemble",
        "methods.trak_ensemble:TRAKEnsemble",
        {"output_function": "square-norm"},
        "D-TRAK averaged over models trained on random halves (n_models, default 4)",
        display_name="D-TRAK ensemble",
    ),
    MethodEntry(
        "journey-trak",
        "methods.journey_trak:JourneyTRAK",
        {},
        "Journey-TRAK: TRAK per sampling step on the query's trajectory, mean over steps",
        display_name="Journey-TRAK",
    ),
    MethodEntry(
        "das",
        "methods.das:DAS",
        {},
        "DAS: TRAK on the mean model output, scores weighted by normalised training error",
        display_name="DAS",
    ),
    MethodEntry(
        "unlearn",
        "methods.unlearn:Unlearn",
        {},
        "unlearning the query (Wang et al. 2024): Fisher-preconditioned ascent, loss increase",
        display_name="Unlearning (Wang et al.)",
    ),
    MethodEntry(
        "tracin",
        "methods.tracin:TracIn",
        {},
        "TracIn-CP: learning-rate-weighted gradient dot products over K training checkpoints",
        display_name="TracIn-CP",
    ),
    MethodEntry(
        "grad-dot",
        "methods.kfac:KFACInfluence",
        {"curvature": "identity"},
        "gradient dot product (identity preconditioner)",
        display_name="gradient dot product",
    ),
    MethodEntry(
        "kfac-empirical-reduce",
        "methods.kfac:KFACInfluence",
        {"hessian": "ggn-loss", "kfac_approx": "reduce"},
        "K-FAC influence, GGN^loss (empirical Fisher), K-FAC reduce",
        display_name="K-FAC influence (empirical, reduce)",
    ),
    MethodEntry(
        "kfac-reduce",
        "methods.kfac:KFACInfluence",
        {"kfac_approx": "reduce"},
        "K-FAC influence, GGN^model, K-FAC reduce",
        display_name="K-FAC influence (reduce)",
    ),
    MethodEntry(
        "kfac-empirical",
        "methods.kfac:KFACInfluence",
        {"hessian": "ggn-loss"},
        "K-FAC influence, GGN^loss (empirical Fisher), K-FAC expand",
        display_name="K-FAC influence (empirical)",
    ),
    MethodEntry(
        "kfac",
        "methods.kfac:KFACInfluence",
        {},
        "K-FAC influence, GGN^model (MC-Fisher), K-FAC expand (the paper's method)",
        display_name="K-FAC influence",
    ),
    MethodEntry(
        "kfac-mloss",
        "methods.kfac:KFACInfluence",
        {"measurement": "loss"},
        "K-FAC influence with the loss as measurement whatever the target (m. loss)",
        display_name="K-FAC influence (m. loss)",
    ),
    MethodEntry(
        "ekfac",
        "methods.kfac:KFACInfluence",
        {"curvature": "ekfac"},
        "EK-FAC influence (eigenvalue-corrected K-FAC), GGN^model, expand",
        display_name="EK-FAC influence",
    ),
    MethodEntry(
        "retrain",
        "methods.retrain:ExactRetraining",
        {},
        "exact retraining oracle (one model per subset, unseen seed)",
        display_name="exact retraining",
    ),
)


class MethodRegistry:
    """Name -> MethodEntry, with built-ins, decorator registrations and entry points.

    The built-ins given to the constructor are numbered by position (their ``order``).
    """

    def __init__(self, builtins: tuple[MethodEntry, ...] = ()) -> None:
        self._entries: dict[str, MethodEntry] = {}
        self._entry_points_loaded = False
        for position, entry in enumerate(builtins):
            self.add(replace(entry, order=position))

    def add(self, entry: MethodEntry) -> None:
        """Register ``entry``; raises DuplicateMethodError if its name is already taken."""
        if not entry.name or entry.name != entry.name.strip() or " " in entry.name:
            raise ValueError(f"invalid method name {entry.name!r}: use a non-empty word")
        existing = self._entries.get(entry.name)
        if existing is not None:
            raise DuplicateMethodError(
                f"method {entry.name!r} is already registered ({existing.origin}: "
                f"{existing.target!r}); pick another name for {entry.target!r} ({entry.origin})"
            )
        self._entries[entry.name] = entry

    def remove(self, name: str) -> None:
        """Unregister ``name`` (no error if it is not registered)."""
        self._entries.pop(name, None)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep.dist, "name", None) or "unknown distribution"
            self.add(
                MethodEntry(ep.name, ep.value, {}, f"plugin from {dist}", f"entry-point ({dist})")
            )

    def reload_entry_points(self) -> None:
        """Forget entry-point registrations and read the group again (after a pip install)."""
        self._entries = {
            k: v for k, v in self._entries.items() if not v.origin.startswith("entry-point")
        }
        self._entry_points_loaded = False
        self._load_entry_points()

    def names(self) -> list[str]:
        """All registered names, sorted (entry points included)."""
        self._load_entry_points()
        return sorted(self._entries)

    def entries(self) -> Mapping[str, MethodEntry]:
        """A read-only view of name -> entry, sorted by name (entry points included)."""
        self._load_entry_points()
        return MappingProxyType(dict(sorted(self._entries.items())))

    def ordered(self) -> list[MethodEntry]:
        """Every entry in table order (:attr:`MethodEntry.sort_key`)."""
        self._load_entry_points()
        return sorted(self._entries.values(), key=lambda entry: entry.sort_key)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def get(self, name: str) -> MethodEntry:
        """The entry of ``name``; raises UnknownMethodError naming the closest known name."""
        self._load_entry_points()
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownMethodError(
                f"unknown method {name!r}.{hint} Known methods: {', '.join(known)}. "
                "List them with `python -m methods --list`."
            ) from None


REGISTRY = MethodRegistry(_BUILTINS)


def register_method(name: str, *, summary: str = "", display_name: str = "", **defaults: Any):
    """Class decorator: ``@register_method("my-method")`` adds the class under ``name``.

    Args:
        name: the registry name, a non-empty word.
        summary: one-line description (default: the first line of the class docstring).
        display_name: label in tables and figures (default: the class's ``display_name``
            attribute if it declares one, else ``name``).
        **defaults: config values of the variant, applied before any overrides.

    Returns:
        The decorator, which registers the class and returns it unchanged.
    """

    def decorator(cls: type[AttributionMethod]) -> type[AttributionMethod]:
        if not (isinstance(cls, type) and issubclass(cls, AttributionMethod)):
            raise TypeError(f"@register_method({name!r}) needs an AttributionMethod subclass")
        doc = (cls.__doc__ or "").strip().splitlines()
        REGISTRY.add(
            MethodEntry(
                name,
                cls,
                defaults,
                summary or (doc[0] if doc else ""),
                "decorator",
                display_name=display_name,
            )
        )
        return cls

    return decorator


def get_method(name: str) -> MethodEntry:
    """The registry entry for ``name``; raises UnknownMethodError listing the known names."""
    return REGISTRY.get(name)


def create_method(name: str, **overrides: Any) -> AttributionMethod:
    """An instance of method ``name`` with config ``overrides`` applied."""
    return REGISTRY.get(name).build(**overrides)


def available_methods() -> list[str]:
    """All registered names: built-ins, decorator registrations and installed plugins."""
    return REGISTRY.names()


def methods_in_table_order() -> list[str]:
    """All registered names in the order of tables and figures.

    Built-ins come first as listed in the registry, then every other registration by name.
    """
    return [entry.name for entry in REGISTRY.ordered()]


def similarity_baselines() -> list[str]:
    """The registered similarity baselines (:attr:`MethodEntry.similarity`), in table order."""
    return [entry.name for entry in REGISTRY.ordered() if entry.similarity]


def default_dampings(names: Iterable[str] | None = None) -> dict[str, float]:
    """Name -> default damping (:attr:`MethodEntry.default_damping`) of each of ``names``.

    ``names`` defaults to every registered method. Only names that are registered and have a
    damping option are kept; other names (e.g. methods of stored results that are not installed
    here) are left out. Imports the modules of those methods.
    """
    wanted = methods_in_table_order() if names is None else list(dict.fromkeys(names))
    out = {}
    for name in wanted:
        if name in REGISTRY:
            damping = REGISTRY.get(name).default_damping
            if damping is not None:
                out[name] = damping
    return out
