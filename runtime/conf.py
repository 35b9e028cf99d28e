"""A job's or a component's `conf`: its `default_conf` updated by the caller's overrides, or by
one of its named `presets`, unknown keys refused by name (docs/architecture.md, "A Python
function per job"). One function for every module that takes a conf, from the jobs down to
the extractor, so that a typo is refused the same way everywhere and before any work."""

from delf_index.errors import UserError


def resolve_conf(conf, defaults, what, presets=None, parts=None):
    """`defaults` updated by `conf`: a dict of overrides, None, or the name of one of `presets`.
    Keys that `defaults` lacks are refused, naming `what` ("unknown extract options [...];
    known: [...]"), and so are those of each nested conf in `parts`, {key: (its name, its
    defaults)}, which are checked only: a job that records every setting of one completes it
    itself. Returns a new dict; the module's own checks of values come after."""
    if isinstance(conf, str):
        if conf not in (presets or {}):
            raise UserError(f"unknown {what} preset {conf!r}; presets: {sorted(presets or {})}")
        conf = presets[conf]
    conf = dict(conf or {})
    refuse_unknown(conf, defaults, what)
    for key, (name, part_defaults) in (parts or {}).items():
        refuse_unknown(conf.get(key) or {}, part_defaults, name)
    return {**defaults, **conf}


def refuse_unknown(conf, defaults, what):
    unknown = set(conf) - set(defaults)
    if unknown:
        raise UserError(f"unknown {what} options {sorted(unknown)}; known: {sorted(defaults)}")
