"""The run spec: train_lt.py's flags as typed, frozen parts, one per group of the flag table (`config.GROUPS`).

    spec.data     DataSpec     the split, its loaders and the test view
    spec.model    ModelSpec    backbone, --init_from, head, head init and prompts, seed
    spec.method   MethodSpec   --method and its settings
    spec.loss     LossSpec     augmentation, loss, sampler, LT-Soups subset
    spec.optim    OptimSpec    optimizer, schedule, steps, batches, EMA, precision
    spec.compile  CompileSpec  torch.compile
    spec.eval     EvalSpec     validation cadence and the metric that picks best/
    spec.output   OutputSpec   output dir, checkpoints, resume, tracking, Hub

The parts are generated from the table: a new flag is a field of its group's part, with the table's default, and needs
no second edit. train_lt.py builds the spec once (`training.resolve_run_spec`), after every cross-flag resolution;
library functions take the part they need and nothing changes it afterwards. `RunSpec.record` is what a run records (in
each resume checkpoint and in the run dir); `changed_flags` compares a recorded spec with a new one as a whole.
"""
import dataclasses

from .config import FLAGS, GROUPS, RESUME_FREE_FLAGS, public_flags
from .methods import method_config

_TYPES = {"int": int, "float": float, "bool": bool, "switch": bool, "str": str, "path": str, "steps": int | str}


def _annotation(flag):
    kind = _TYPES[flag.kind]
    kind = tuple[kind, ...] if flag.nargs else kind
    return kind | None if flag.nullable or flag.default is None else kind


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def _plain(value):
    """A value as JSON and yaml hold it (tuples are lists), so recorded and new values compare alike."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


class SpecPart:
    """What every part of a RunSpec does; its fields (the flags of one group) come from the table."""

    @classmethod
    def from_values(cls, values):
        """The part of a flag -> value mapping; flags the mapping lacks keep the table's defaults."""
        return cls(**{f.name: _frozen(values[f.name]) for f in dataclasses.fields(cls) if f.name in values})

    def values(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _part_class(group):
    names = [name for name, flag in FLAGS.items() if flag.group == group]
    fields = [(name, _annotation(FLAGS[name]), dataclasses.field(default=_frozen(FLAGS[name].default)))
              for name in names]
    return dataclasses.make_dataclass(f"{group.capitalize()}Spec", fields, bases=(SpecPart,), frozen=True,
                                      namespace={"__module__": __name__,
                                                 "__doc__": f"The {GROUPS[group]} flags of a run."})


PARTS = {group: _part_class(group) for group in GROUPS}
DataSpec, ModelSpec, MethodSpec = PARTS["data"], PARTS["model"], PARTS["method"]
LossSpec, OptimSpec, CompileSpec = PARTS["loss"], PARTS["optim"], PARTS["compile"]
EvalSpec, OutputSpec = PARTS["eval"], PARTS["output"]


class _Run:
    @classmethod
    def from_values(cls, values):
        """The spec of a (resolved) flag -> value mapping."""
        return cls(**{group: part.from_values(values) for group, part in PARTS.items()})

    def values(self):
        """Every flag's value, flat."""
        return {name: value for group in PARTS for name, value in getattr(self, group).values().items()}

    def record(self):
        """What a run records of its spec: per part, every flag's value as JSON holds it, secrets blanked."""
        return {group: {name: _plain(value) for name, value in public_flags(getattr(self, group).values()).items()}
                for group in PARTS}


RunSpec = dataclasses.make_dataclass(
    "RunSpec", [(group, part) for group, part in PARTS.items()], bases=(_Run,), frozen=True,
    namespace={"__module__": __name__, "__doc__": "A training run's flags, one frozen part per group of the table."})


def method_config_of(method, num_classes, num_layers):
    """The run's method config (lt_utils.methods) from its MethodSpec: the flags are the config's fields by name
    (--adapter_dim is the rank r); LIFT's defaults resolved for K classes and L blocks."""
    return method_config(method.method, num_classes, num_layers, **method.values())


def flat_record(record):
    """A recorded spec (RunSpec.record, or a flat config.yaml) as flag -> value."""
    if all(group in record and isinstance(record[group], dict) for group in PARTS):
        return {name: value for group in PARTS for name, value in record[group].items()}
    return dict(record)


def changed_flags(recorded, spec):
    """{flag: (recorded value, new value)} of the flags that may not change on a resume and differ. `recorded` is flat
    (flat_record); a flag it lacks did not exist when it was written, so it counts as the table's default."""
    new = spec.record()
    changes = {}
    for group in PARTS:
        for name, value in new[group].items():
            if name in RESUME_FREE_FLAGS:
                continue
            old = _plain(recorded.get(name, FLAGS[name].default))
            if old != value:
                changes[name] = (old, value)
    return changes


def describe_changes(changes):
    """`--head_scale 25.0 -> 30.0, --seed 0 -> 1`."""
    return ", ".join(f"--{name} {_shown(old)} -> {_shown(new)}" for name, (old, new) in changes.items())


def _shown(value):
    if value is None:
        return "unset"
    return str(value).lower() if isinstance(value, bool) else str(value)
