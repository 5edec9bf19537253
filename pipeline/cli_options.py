"""Shared pieces of the ``lookalike`` command line: argparse value types, the options
several commands take (--workdir, --config/--set), JSON output, and the check of what
``embed`` passes on to Beam."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from collections.abc import Collection, Sequence

DEFAULT_WORKDIR = os.environ.get("LOOKALIKE_WORKDIR", "./lookalike-data")
DEFAULT_PORT = 8765


def _int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer >= ``low`` (and <= ``high`` when given; argparse names the
    option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, *, low_open: bool = False):
    """An argparse type: a number in [low, high] (or (low, high] with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}")
        return value

    return parse


def watch_interval(text: str) -> float:
    """``serve --watch-interval-s``: 0 (never) or 0.1-3600 s (a nanosecond interval kept a
    core busy polling CURRENT)."""
    value = _float_in(0.0, 3600.0)(text)
    if 0 < value < MIN_WATCH_INTERVAL_S:
        raise argparse.ArgumentTypeError(f"must be 0 (never) or from {MIN_WATCH_INTERVAL_S:g} to 3600 seconds, "
                                         f"got {value:g}")
    return value


MIN_WATCH_INTERVAL_S = 0.1
POSITIVE = _int_at_least(1)
# Results a query may ask for: the server's limit (``lookalike.serving.schemas.MAX_K``, not
# imported here: the CLI parses its arguments without loading the server's modules).
MAX_RESULTS = 100
RESULT_COUNT = _int_at_least(1, MAX_RESULTS)


def PORT(text: str) -> int:  # noqa: N802 (an argparse type, named like POSITIVE)
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    value = _int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port between 0 and 65535, got {value}")
    return value


def NON_EMPTY(text: str) -> str:  # noqa: N802 (an argparse type, named like POSITIVE)
    """An argparse type: any text but the empty string (what an unset shell variable gives)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (an unset variable?)")
    return text


def _is_number_list(text: str) -> bool:
    """Whether ``text`` is comma-separated numbers (``-0.1,0.2``; nan and inf count)."""
    try:
        [float(value) for value in text.split(",")]
    except ValueError:
        return False
    return True


def attach_negative_values(argv: Sequence[str], options: Sequence[str], any_value: Sequence[str] = (),
                           option_names: Collection[str] = ()) -> list[str]:
    """``argv`` with ``OPTION VALUE`` written ``OPTION=VALUE`` for each of ``options`` whose
    value starts with '-' and is comma-separated numbers: argparse takes ``-0.1,0.2`` for an
    option and refuses ``--vector -0.1,0.2`` ("expected one argument"); and for each of
    ``any_value`` whose value starts with a single '-' not followed by a letter that makes it
    one of ``option_names`` (``query --id -x.png``: an item id may start with '-'; ``--id -k3``
    still lacks its value, as ``--id --json`` does). Anything else, and everything after
    ``--``, is left as it is."""
    out: list[str] = []
    at = 0
    while at < len(argv):
        arg = argv[at]
        if arg == "--":
            return out + list(argv[at:])
        following = argv[at + 1] if at + 1 < len(argv) else None
        if following is not None and following.startswith("-") and following != "--" and (
                (arg in options and _is_number_list(following))
                or (arg in any_value and not following.startswith("--") and following[:2] not in option_names)):
            out.append(f"{arg}={following}")
            at += 2
            continue
        out.append(arg)
        at += 1
    return out


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS)
                or "%(default)" in text):
            return text
        return f"{text} (default %(default)s)"


def _add_workdir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir", default=DEFAULT_WORKDIR,
        help="artifact store: corpus/, models/, embeddings/, indexes/, CURRENT "
        "(default: $LOOKALIKE_WORKDIR or ./lookalike-data)",
    )


def _add_train_config(p: argparse.ArgumentParser, default: str | None = "digits",
                      config_help: str = "training preset (default: digits)") -> None:
    from lookalike.model.config import preset_names

    p.add_argument("--config", default=default, choices=preset_names(), help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set num_steps=200 --set conv_widths=16,32 (repeatable)")


def add_metadata_option(p, default_help: str = "") -> None:
    """``--metadata FILE`` of the commands that embed the corpus (embed, reindex) on parser or group ``p``."""
    p.add_argument("--metadata", default=None, metavar="FILE", type=NON_EMPTY,
                   help="item metadata to index with the embeddings: a .jsonl, .csv or .parquet file with an 'id' "
                   "column (item ids, e.g. 3/digit_0042.png; a video's id covers all its frames) and any other columns "
                   "(source, tags, ...), which searches can filter on; tags: a JSON list, or in CSV a ';'-separated string"
                   + default_help)


def _train_config(args: argparse.Namespace):
    from lookalike.model.config import apply_overrides, get_config

    unlabelled = ["unlabelled=true"] if getattr(args, "unlabelled", False) else []
    return apply_overrides(get_config(args.config), [*args.overrides, *unlabelled])


def _print_json(obj, *, one_line: bool = False) -> None:
    """``obj`` as JSON on stdout: indented, or compact on one line (``one_line``: a cron log
    appended night after night reads with ``tail -1 | jq``)."""
    from lookalike.model.metrics import json_ready

    print(json.dumps(json_ready(obj), indent=None if one_line else 2, default=str, allow_nan=False), flush=one_line)


def expanded_wildcard(argv: Sequence[str], unknown: Sequence[str], options: Collection[str]) -> str | None:
    """Why arguments were refused when the words right after the value of one of
    ``options`` (``corpus_options``: ``--corpus``) are existing paths, as a shell
    makes of an unquoted ``--corpus photos/*.jpg``; None otherwise. The message also lists any
    other unknown argument."""
    for at, arg in enumerate(argv[:-2]):
        if arg not in options:
            continue
        names = list(itertools.takewhile(lambda word: not word.startswith("-"), argv[at + 2:]))
        if not names or not all(name in unknown and os.path.lexists(name) for name in names):
            continue
        shown = " ".join(names[:3]) + (f" ... ({len(names)} names)" if len(names) > 3 else "")
        others = [word for word in unknown if word not in names]
        return (f"unrecognized arguments after {arg} {argv[at + 1]}: {shown}: existing paths, as the shell makes of "
                f"an unquoted wildcard; quote the pattern ({arg} 'photos/*.jpg'), or pass the folder"
                + (f"; also unrecognized: {' '.join(others)}" if others else ""))
    return None


# Options that take a folder or glob of the corpus, which a shell expands when it is not quoted.
CORPUS_OPTIONS = ("--corpus",)


def corpus_options(parser: argparse.ArgumentParser) -> set[str]:
    """Of ``CORPUS_OPTIONS``, those ``parser`` has (``embed`` and ``reindex``)."""
    return {name for action in parser._actions for name in action.option_strings if name in CORPUS_OPTIONS}


def misspelled_pass_through(unknown: Sequence[str], own_options: Sequence[str]) -> str | None:
    """Why ``embed``'s unknown arguments (passed on to Beam) cannot be meant for Beam, or None:
    a stray word (Beam takes only ``--name[=value]`` options and their values), or an option
    within a typo of one of embed's own (``--incremntal``), which Beam would only warn about
    ("Unparseable argument") while the run went on without it."""
    import difflib

    beam_options = beam_option_names()
    # Beam's parser out of reach: no typo check (a Beam option could look like a typo of ours),
    # but a stray word is still refused.
    longs = [o for o in own_options if o.startswith("--")] if beam_options is not None else []
    previous_takes_value = False
    for arg in unknown:
        if not arg.startswith("-"):
            if not previous_takes_value:
                return f"unrecognized argument {arg!r} (only Beam options, --name=value, pass through to Beam)"
            previous_takes_value = False
            continue
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, longs, n=1, cutoff=0.8)
        if close and beam_options is not None and name not in beam_options:  # Dataflow's --num_workers is Beam's, not a typo of --num-workers
            return f"unrecognized option {name}: did you mean {close[0]}?"
        previous_takes_value = "=" not in arg
    return None


def beam_option_names() -> set[str] | None:
    """Every option string Beam's ``PipelineOptions`` classes define (as Beam's own parser
    collects them), or None when that parser cannot be built."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

        parser = _BeamArgumentParser(allow_abbrev=False)
        for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
            cls._add_argparse_args(parser)
        return set(parser._option_string_actions)
    except Exception as e:  # a Beam release without these internals
        logging.getLogger(__name__).debug("cannot list Beam's options: %s", e)
        return None
