"""Log levels of the command-line entry points: the project's own progress and summary lines at
INFO, the libraries beneath (absl, Orbax, JAX, Grain, ...) at WARNING unless asked otherwise; left
alone, Orbax and absl print about a thousand INFO lines per run and hide the progress lines."""

import logging

from absl import logging as absl_logging

PROJECT = ("mimo_jax", "data_pipelines", "experiments", "sharding", "__main__")
LEVELS = ("debug", "info", "warning", "error")


def configure(library_level: str = "warning") -> None:
    """Libraries log at `library_level` (one of LEVELS); the project's loggers at INFO."""
    if library_level not in LEVELS:
        raise ValueError(f"log level {library_level!r}: expected one of {', '.join(LEVELS)}")
    level = getattr(logging, library_level.upper())
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    absl_logging.set_verbosity(library_level)
    logging.getLogger("absl").setLevel(level)
    for name in PROJECT:
        logging.getLogger(name).setLevel(min(level, logging.INFO))


def add_flag(parser) -> None:
    """`--log-level` for an argparse command."""
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=LEVELS,
        help="level of the libraries' logs (the command's own lines always show)",
    )
