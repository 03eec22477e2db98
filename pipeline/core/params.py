"""Typed parameters: read `params.yaml`, apply `--set section.key=value` overrides, validate.

Each stage owns a pydantic model `Params` (frozen, `extra="forbid"`) for its own section of
`params.yaml`; the shared `paths` section is `Paths` below. Validation happens before any work,
and every failure names the offending key (`decode.num_frames: ...`), never a bare traceback.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.fingerprint import fingerprint

DEFAULT_PARAMS_FILE = Path("params.yaml")
LabelSource = Literal["clips", "motion_gt"]  # the frames the motion branch pseudo-labels


class ParamsError(ValueError):
    """A params file or override is malformed; the message names the key."""


class StageParams(BaseModel):
    """Base of every stage's `Params`: unknown keys are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(StageParams):
    """Where the pipeline's data lives, relative to the project root (the working directory)."""

    raw: Path = Field(Path("data/raw"), description="input: a folder of videos (class sub-folders "
                      "give labels) or a manifest file; demo_data writes a folder here")
    motion_gt: Path = Field(Path("data/motion_gt"), description="clips with exact flow and tracks")
    clips: Path = Field(Path("data/clips.zarr"), description="decoded clips store")
    reports: Path = Field(Path("reports"), description="stage reports: full results (results.json), "
                          "curves, images")
    metrics: Path = Field(Path("metrics"), description="DVC metrics files: each stage's headline scalars")
    artifacts: Path = Field(Path("artifacts"), description="trained models")
    runs: Path = Field(Path("runs"), description="resumable in-progress state")
    targets: Path = Field(Path("data/targets.zarr"), description="VQGAN codes and RGB differences "
                          "of the clips (targets stage)")
    labels: Path = Field(Path("data/labels.zarr"), description="pseudo-labels of the clips")
    train_labels: Path = Field(Path("data/train_labels.zarr"), description="densified, re-balanced "
                               "pseudo-labels of the clips")
    motion_gt_labels: Path = Field(Path("data/motion_gt_labels.zarr"), description="pseudo-labels of "
                                   "the motion_gt frames (made from the frames alone)")
    motion_gt_train_labels: Path = Field(Path("data/motion_gt_train_labels.zarr"),
                                         description="densified pseudo-labels of the motion_gt frames")

    def ground_truth(self) -> Path:
        """The motion_gt store: frames with exact flow, tracks and visibility."""
        return self.motion_gt / "gt.zarr"

    def frames(self, source: LabelSource) -> Path:
        """The frames store a label source names: the decoded clips or the motion_gt frames."""
        return self.clips if source == "clips" else self.ground_truth()

    def label_store(self, source: LabelSource) -> Path:
        """The pseudo-labels of a source (pseudo_labels writes them)."""
        return self.labels if source == "clips" else self.motion_gt_labels

    def train_label_store(self, source: LabelSource) -> Path:
        """The densified pseudo-labels of a source (densify writes them, refine reads them)."""
        return self.train_labels if source == "clips" else self.motion_gt_train_labels

    def artifacts_of(self, stage: str) -> Path:
        """The folder of a stage's models."""
        return self.artifacts / stage

    def reports_of(self, stage: str, source: str | None = None) -> Path:
        """The folder of a stage's reports (one per source for the per-source stages)."""
        return self.reports / stage if source is None else self.reports / stage / source

    def metrics_of(self, stage: str, source: str | None = None) -> Path:
        """The DVC metrics file of a stage (one per source for the per-source stages)."""
        return self.metrics / f"{stage}.json" if source is None else self.metrics / stage / f"{source}.json"

    def runs_of(self, stage: str) -> Path:
        """The resumable in-progress state of a stage."""
        return self.runs / stage


M = TypeVar("M", bound=BaseModel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (YAML keeps the last silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no Python objects), refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_params_file(path: Path | str = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """Read a params YAML file into a dict of sections; a missing file gives an empty dict."""
    path = Path(path)
    if not path.exists():
        if path == DEFAULT_PARAMS_FILE:
            return {}
        raise ParamsError(f"params file not found: {path}")
    try:
        doc = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read it ({err})") from err
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(doc).__name__}")
    for section, body in doc.items():
        if body is not None and not isinstance(body, dict):
            raise ParamsError(f"{section}: expected a mapping of keys, got {body!r}")
    return doc


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `doc` with `section.key=value` overrides applied (values parsed as YAML)."""
    doc = copy.deepcopy({section: dict(body or {}) for section, body in doc.items()})
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ParamsError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError as err:
            raise ParamsError(f"--set {key}: cannot parse value {raw_value!r}: {err}") from err
        target = doc.setdefault(section, {})
        *parents, leaf = name.split(".")  # nested keys: pretrain.train.steps=10
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ParamsError(f"--set {key}: {parent} is not a mapping")
        target[leaf] = value
    return doc


def validate_section(doc: dict[str, Any], section: str, model: type[M]) -> M:
    """Validate `doc[section]` against `model`; errors name `section.key` and the problem."""
    body = doc.get(section) or {}
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise ParamsError(format_validation_error(section, err)) from None


def format_validation_error(section: str, err: ValidationError) -> str:
    """One line per problem: `section.key: message (got value)`."""
    lines = []
    for problem in err.errors():
        key = ".".join([section, *(str(part) for part in problem["loc"])])
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (not a parameter of this section)"
        got = problem.get("input")
        suffix = f" (got {got!r})" if problem["type"] != "missing" and not isinstance(got, dict) else ""
        lines.append(f"{key}: {message}{suffix}")
    return "invalid params:\n  " + "\n  ".join(lines)


def params_hash(model: BaseModel) -> str:
    """A short stable hash of validated params, for tagging runs and invalidating partial state."""
    return fingerprint(model)


def describe_params(model: type[BaseModel], section: str, defaults: BaseModel | None = None) -> str:
    """Human-readable list of a section's params with types, defaults and descriptions (for --help).

    A nested section (a stage's `train:`) shows the stage's defaults for it, not the nested model's own.
    """
    lines = []
    for name, field in model.model_fields.items():
        default = (getattr(defaults, name) if defaults is not None
                   else field.get_default(call_default_factory=True))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            lines.append(describe_params(field.annotation, f"{section}.{name}", default))
            continue
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        annotation = annotation.replace("typing.", "").replace("pathlib.", "")
        default = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        text = f"  {section}.{name} ({annotation}, default {default!r})"
        if field.description:
            text += f"\n      {field.description}"
        lines.append(text)
    return "\n".join(lines)
