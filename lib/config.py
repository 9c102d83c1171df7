"""Typed configuration from the command line: `--key=value` overrides and `key = value` files.

Values are converted to the dataclass field's type (never exec'd, unlike nanoGPT's configurator):
`--lr=1` is a float, `--compile=false`, `0` or `FALSE` a bool, a bare `--flag` means true, and an
unknown key fails in one line with a "did you mean".
"""
import dataclasses
import difflib
import errno
import inspect
import math
import os
import re
import sys
from pathlib import Path

from lib.common import UserError


def convert(key, value, typ):
    """A string from the command line or a config file -> the field's type, or a one-line error."""
    try:
        if typ is bool:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        out = typ(value)
        if typ is float and not math.isfinite(out):
            raise UserError(f"--{key}={value}: expected a finite number")
        return out
    except ValueError:
        raise UserError(f"--{key}={value!r}: expected {typ.__name__}") from None


def read_config_file(path):
    """One `key = value` a line; '#' starts a comment unless inside a quoted value -> [(key, value)]."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a UTF-8 text file (byte {e.start}); "
                        f"a config file holds key = value lines") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not key or key.startswith("#"):
            continue
        if value[:1] in ("'", '"'):  # quoted: the value ends at the closing quote, '#' and all
            end = value.find(value[0], 1)
            rest = value[end + 1:].strip() if end > 0 else "?"
            if end < 0 or (rest and not rest.startswith("#")):
                raise UserError(f"{path}:{n}: unbalanced quotes in {line.strip()!r}")
            value = value[1:end]
        else:
            value = value.split("#")[0].strip()
        if not eq or "#" in key:
            raise UserError(f"{path}:{n}: expected 'key = value', got {line.strip()!r}")
        pairs.append((key, value))
    return pairs


def parse_overrides(args, *config_classes):
    """['cfg.txt', '--lr=3e-4', ...] -> {'lr': 0.0003, ...}, typed by the dataclasses' fields."""
    types = {}
    for cls in config_classes:
        types.update({f.name: f.type for f in dataclasses.fields(cls)})
    pairs = []
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            pairs.append((key, value if eq else None))  # a bare --flag means true
        else:
            pairs += read_config_file(arg)
    out = {}
    for key, value in pairs:
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise UserError(f"unknown config key --{key}{hint}")
        if value is None and types[key] is not bool:
            raise UserError(f"--{key}: write overrides as --key=value")
        out[key] = True if value is None else convert(key, value, types[key])
    return out


FIELD_LINE = re.compile(r"\s+(\w+): [^=#]+=[^#]*#\s?(.*)$")  # `name: type = default  # what it means`
COMMENT_LINE = re.compile(r"\s+#\s?(.*)$")  # a comment's next line, under it


def field_help(cls):
    """{key: what it means}, from the comment beside each field in the dataclass's source (and its
    bases'): the help is written once, where the field is."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        key = None
        for line in inspect.getsource(klass).splitlines():
            field, more = FIELD_LINE.match(line), COMMENT_LINE.match(line)
            if field:
                key, out[field.group(1)] = field.group(1), field.group(2).strip()
            elif more and key:
                out[key] += " " + more.group(1).strip()
            else:
                key = None
    return out


def config_help(*config_classes, defaults=None, titles=None):
    """Every key with its default and what it means, one line each, a group per dataclass."""
    lines = []
    for k, cls in enumerate(config_classes):
        if titles:
            lines.append(f"{titles[k]}:")
        meaning = field_help(cls)
        for f in dataclasses.fields(cls):
            default = (defaults or {}).get(f.name, f.default)
            lines.append(f"  --{f.name}={default}".ljust(26) + f" {meaning.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def cli(main):
    """Run a script's main(argv) and exit with what it returns (None is 0): a UserError becomes one
    line on stderr and exit status 2, a full disk one line and 1, Ctrl-C one line and 130."""
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and exits 130 itself)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python train.py --help | head`: the reader left, nothing is wrong
        sys.stderr.close()
        sys.exit(0)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        print(f"error: could not write {e.filename or 'a file'}: {e.strerror}; free some space and run "
              "again (what was saved before is kept)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def usage(text, argv):
    """Print a script's usage -> its exit status: 0 when asked for (--help), 2 when nothing was given
    to run (the usage goes to stderr then, as a mistake's message does)."""
    asked = "-h" in argv or "--help" in argv
    print(text, file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2

