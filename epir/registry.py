"""The model interface and the one registry of models: what a model must be, and every model the grid,
``epir info``, the cell ids, the report's published figures and ``predict`` know.

A model is a config class and an ``nn.Module`` built from one config:

- the config (:class:`ModelConfig`, structurally; :class:`MERConfig` is a base that already meets it) is a
  frozen dataclass with a class attribute ``family`` and the fields ``img_size`` (input side H = W, pixels),
  ``num_classes`` (C), ``contrastive`` (whether training adds EPIR's margin contrastive term on the
  features, eq. (23)) and ``alpha`` (its margin), and an ``input_convention``
  (:class:`epir.inputs.InputConvention`: which flow channels, in which order, on which scale; the data path
  converts the shards' ``[u, v, strain]`` to it);
- the module (:class:`MERModel`) keeps its config as ``.config`` and maps flows ``(B, Cin, H, W)`` (``Cin =
  len(input_convention.channels)``) to logits ``(B, C)``; with ``return_features=True`` it returns
  ``(logits (B, C), features (B, D))``, the features the contrastive term compares.

:func:`check_model` checks both once, before any training, and raises :class:`ModelInterfaceError` naming
the missing piece. A model registers with one decorator in its own module (:func:`register_model`, as
timm's ``@register_model``): its family, its preset (the name ``--presets`` takes), its published recipe, its
published figures (:class:`Published`, each saying whether it peeks at the test subject) and its source. A
file of one's own joins with :func:`load_model_file` (``grid/run_all.py --model-file``); a peer of the
project is one new module under ``epir/models/``, imported by :func:`load_builtin_models`.

Imports torch only (no Ray, MLflow, Optuna or pydantic): the GPU machine's path reads it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .inputs import FLOW_CHANNELS, InputConvention


@runtime_checkable
class ModelConfig(Protocol):
    """What a model's config carries (see the module docstring); a frozen dataclass."""

    family: ClassVar[str]
    img_size: int
    num_classes: int
    contrastive: bool
    alpha: float

    @property
    def input_convention(self) -> InputConvention: ...


class MERModel(Protocol):
    """What a model is: ``forward(x (B, Cin, H, W)) -> logits (B, C)``, or ``(logits (B, C), features (B, D))``
    with ``return_features=True``; its config as ``.config``."""

    config: ModelConfig

    def forward(self, x: torch.Tensor, return_features: bool = False): ...


@dataclass(frozen=True)
class MERConfig:
    """A base for a model's config that meets :class:`ModelConfig`: subclass it as a frozen dataclass, set the
    class attribute ``family``, add the model's own fields (each with a default).

    Attributes:
        img_size: input side H = W in pixels (28, the composite's flows).
        num_classes: C.
        contrastive, alpha: add EPIR's margin contrastive loss with margin ``alpha`` (off by default).
        input_convention: the shards' ``[u, v, strain]`` on 0..1 (override the property for another layout).
    """

    family: ClassVar[str] = ""
    img_size: int = 28
    num_classes: int = 3
    contrastive: bool = False
    alpha: float = 0.4

    @property
    def input_convention(self) -> InputConvention:
        """The flows as the shards hold them: channels ``[u, v, strain]``, any value range, scale 1."""
        return InputConvention(FLOW_CHANNELS, None, 1.0)

    @property
    def in_chans(self) -> int:
        """Input channels Cin."""
        return len(self.input_convention.channels)


class ModelInterfaceError(TypeError):
    """A model or its config misses a piece of the interface (the message names it)."""


@dataclass(frozen=True)
class Published:
    """One figure a source reports for a model.

    Attributes:
        protocol: ``CDE`` or ``SDE``; dataset: ``full`` (the composite), ``samm``, ``casme2``, ``smic``, ``casme3``.
        uf1, uar: the figures (UAR None where the source gives none).
        peeks: True when the source chose each fold's epoch (or a configuration) on its test subject, False
            when it did not, None when unknown.
        source: where the figure is printed.
        label: how a table names the row of this figure (default: the preset's or model's name).
    """

    protocol: str
    dataset: str
    uf1: float
    uar: float | None
    peeks: bool | None
    source: str
    label: str = ""


@dataclass(frozen=True)
class Family:
    """A model family: its config class, its module class, and the frozen reference values its cell ids are
    hashed against (``grid.ids.cell_id``: a setting that differs from them enters the id; None: every
    field enters it, so a changed default always makes new cells)."""

    name: str
    config: type
    model: type
    id_reference: dict | None = None
    source: str = ""


@dataclass(frozen=True)
class Preset:
    """One named model: what ``--presets`` and ``epir info --preset`` take.

    Attributes:
        name: the preset's name; family: a key of :data:`FAMILIES`.
        model: config fields set over the family's defaults.
        recipe: ``epir.train.TrainRecipe`` fields of its own (published) recipe; empty for the ladder.
        profiled: True when the grid's training profiles size it (the EPIR ladder); False for a model that
            keeps ``recipe`` whatever the profile.
        published: the figures its sources report (:class:`Published`).
        source: where its architecture and recipe come from.
        module_file: the file it was registered from when that is a user's file (``--model-file``), else "".
    """

    name: str
    family: str
    model: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    profiled: bool = True
    published: tuple[Published, ...] = ()
    source: str = ""
    module_file: str = ""

    def figure(self, protocol: str = "CDE", dataset: str = "full") -> Published | None:
        """Its first published figure of ``protocol`` on ``dataset``, or None."""
        return next((p for p in self.published if (p.protocol, p.dataset) == (protocol, dataset)), None)


FAMILIES: dict[str, Family] = {}
PRESETS: dict[str, Preset] = {}
# figures of models the project does not implement (e.g. MFDAN), by the name a table gives them
UNIMPLEMENTED: dict[str, tuple[Published, ...]] = {}
_LOADING: list[str] = []  # the user file being imported (load_model_file), so that its presets name it


def register_family(config: type, model: type, id_reference: dict | None = None, source: str = "") -> Family:
    """Register a model family (``config.family``); re-registering the same classes is a no-op.

    Raises:
        ModelInterfaceError: the config class has no ``family`` or is not a dataclass.
        ValueError: another family of that name is registered.
    """
    name = getattr(config, "family", "")
    if not isinstance(name, str) or not name:
        raise ModelInterfaceError(f"{config.__name__}: a model config needs a class attribute `family` (its name)")
    if not dataclasses.is_dataclass(config):
        raise ModelInterfaceError(f"{config.__name__}: a model config must be a (frozen) dataclass")
    old = FAMILIES.get(name)
    if old and (old.config.__qualname__, old.model.__qualname__) != (config.__qualname__, model.__qualname__):
        raise ValueError(f"model family {name!r} is registered already ({old.config.__name__}, {old.model.__name__})")
    FAMILIES[name] = Family(name, config, model, None if id_reference is None else dict(id_reference), source)
    return FAMILIES[name]


def register_preset(name: str, family: str, model: dict | None = None, recipe: dict | None = None,
                    profiled: bool = False, published=(), source: str = "") -> Preset:
    """Register a preset of a registered family (see :class:`Preset`).

    Raises:
        KeyError: the family is not registered. ValueError: another preset of that name is registered.
    """
    if family not in FAMILIES:
        raise KeyError(f"preset {name!r}: unknown model family {family!r}; register it first")
    p = Preset(name, family, dict(model or {}), dict(recipe or {}), profiled, tuple(published), source,
               _LOADING[-1] if _LOADING else "")
    old = PRESETS.get(name)
    if old and (old.family, old.model, old.recipe) != (p.family, p.model, p.recipe):
        raise ValueError(f"preset {name!r} is registered already (family {old.family})")
    PRESETS[name] = p
    return p


def register_model(name: str, *, config: type, recipe: dict | None = None, published=(), source: str = "",
                   id_reference: dict | None = None):
    """Class decorator: register the model class with its config class as a family, and a preset ``name`` that
    trains it with ``recipe`` (``epir.train.TrainRecipe`` fields; the grid's profiles do not resize it)::

        @register_model("mynet", config=MyNetConfig, recipe=dict(epochs=60, lr=1e-3), source="my paper")
        class MyNet(nn.Module): ...

    Raises:
        as :func:`register_family` and :func:`register_preset`.
    """
    def wrap(model_cls: type) -> type:
        register_family(config, model_cls, id_reference, source)
        register_preset(name, config.family, recipe=recipe, profiled=False, published=published, source=source)
        return model_cls

    return wrap


def register_published(name: str, published) -> None:
    """Figures of a model that the project does not implement (e.g. MFDAN), shown beside ours in the tables."""
    UNIMPLEMENTED[name] = tuple(published)


def load_builtin_models() -> None:
    """Import every module of :mod:`epir.models`: each registers its model (a peer of the project is one file
    there, no edit elsewhere)."""
    import pkgutil

    from . import models

    for m in pkgutil.iter_modules(models.__path__):
        importlib.import_module(f"{models.__name__}.{m.name}")


def load_model_file(path: str | Path) -> list[str]:
    """Import a user's model file (``--model-file``) under its stem as module name (the name a Ray worker imports
    it by, once the file is shipped there) and return the presets it registered.

    Raises:
        FileNotFoundError: no such file. ValueError: it is not a ``.py`` file, its stem is not a valid module
            name or clashes with an imported module, or it registered no preset.
        ModelInterfaceError: a model it registered misses a piece of the interface (:func:`check_model`).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--model-file {path}: no such file")
    if path.suffix != ".py" or not path.stem.isidentifier():
        raise ValueError(f"--model-file {path}: expected a Python file whose name is a module name (e.g. my_net.py)")
    known = sys.modules.get(path.stem)
    if known is not None:
        if getattr(known, "__file__", None) and Path(known.__file__).resolve() == path:
            return [p.name for p in PRESETS.values() if p.module_file == str(path)]
        raise ValueError(f"--model-file {path}: its name {path.stem!r} is taken by the module {known!r}; rename the file")
    before = set(PRESETS)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    _LOADING.append(str(path))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(path.stem, None)
        raise
    finally:
        _LOADING.pop()
    names = [n for n in PRESETS if n not in before]
    if not names:
        raise ValueError(f"--model-file {path}: it registered no model (decorate the model class with "
                         "epir.registry.register_model)")
    for n in names:
        check_model(make_config(n))
    return names


def import_model_modules(names) -> None:
    """Import a user's model modules by name (on a Ray worker, where the job's ``py_modules`` put the files on
    ``sys.path``), so that their families are registered before a config is rebuilt there.

    Raises:
        ModuleNotFoundError: a module is not importable (the file was not shipped).
    """
    for name in names:
        if name not in sys.modules:
            importlib.import_module(name)


def make_config(preset: str, **overrides):
    """The config of a preset, with field overrides.

    Raises:
        KeyError: an unknown preset; TypeError: a field the family does not have; ValueError: an invalid config.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    p = PRESETS[preset]
    return dataclasses.replace(FAMILIES[p.family].config(), **{**p.model, **overrides})


def check_model(config, model: nn.Module | None = None) -> None:
    """Check a model and its config against the interface (module docstring), once, before training: the config's
    fields, then a forward of a zero batch ``(2, Cin, img_size, img_size)`` in eval mode, with and without
    ``return_features``. ``model`` defaults to a fresh one built from ``config``.

    Raises:
        ModelInterfaceError: the first missing or wrong piece, named (e.g. "its config lacks `input_convention`").
    """
    family = getattr(type(config), "family", None)
    who = f"model family {family!r}" if family else f"config {type(config).__name__}"
    if not isinstance(family, str) or family not in FAMILIES:
        raise ModelInterfaceError(f"{who}: not a registered family (register it with epir.registry.register_model)")
    wants = {"img_size": int, "num_classes": int, "contrastive": bool, "alpha": (int, float)}
    for name, kind in wants.items():
        if not isinstance(getattr(config, name, None), kind):
            raise ModelInterfaceError(f"{who}: its config lacks `{name}` ({kind if isinstance(kind, type) else float})")
    conv = getattr(config, "input_convention", None)
    if not isinstance(conv, InputConvention):
        raise ModelInterfaceError(f"{who}: its config lacks `input_convention` (an epir.inputs.InputConvention: which "
                                  "flow channels, in which order, on which scale)")
    model = model if model is not None else FAMILIES[family].model(config)
    if getattr(model, "config", None) is None:
        raise ModelInterfaceError(f"{who}: the model does not keep its config as `.config`")
    x = torch.zeros(2, len(conv.channels), config.img_size, config.img_size)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
            both = model(x, return_features=True)
    except Exception as e:  # any failure of a forward on the declared input is the model's
        raise ModelInterfaceError(f"{who}: forward of a zero batch {tuple(x.shape)} (its input_convention and "
                                  f"img_size) failed: {type(e).__name__}: {e}") from e
    finally:
        model.train(was)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, config.num_classes):
        raise ModelInterfaceError(f"{who}: forward(x) must return logits (B, {config.num_classes}), got "
                                  f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not (isinstance(both, tuple) and len(both) == 2 and all(isinstance(t, torch.Tensor) for t in both)
            and tuple(both[0].shape) == (2, config.num_classes) and both[1].dim() == 2 and both[1].shape[0] == 2):
        raise ModelInterfaceError(f"{who}: forward(x, return_features=True) must return (logits (B, C), features "
                                  "(B, D))")
