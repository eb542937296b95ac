"""The ``stemml`` command: list the analyses, run one on your data, build the book.

``stemml list``
    each analysis notebook with its parameters and defaults;
``stemml run NAME --input PATH --output-dir DIR [-p KEY VALUE]...``
    runs ``notebooks/NAME.ipynb`` with papermill on ``PATH``; results and the
    executed notebook go to ``DIR``;
``stemml book [--no-execute]``
    builds the Jupyter Book into ``book/_build/html``.

This is the only module that imports papermill or Jupyter Book.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


class CommandError(Exception):
    """A failure reported to the user as one line, with a non-zero exit status."""


def notebooks_dir() -> Path:
    """Folder of the analysis notebooks: ``$STEMML_NOTEBOOKS`` or ``notebooks/`` of the checkout."""
    return Path(os.environ.get("STEMML_NOTEBOOKS", ROOT / "notebooks"))


def analyses() -> dict[str, Path]:
    """Name of every analysis notebook mapped to its ``.ipynb`` file."""
    return {path.stem: path for path in sorted(notebooks_dir().glob("*.ipynb"))}


def _parameters(notebook: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(notebook))


def _value(text: str):
    """A ``-p`` value: None, True, False, an int, a float, or else the string itself."""
    literals = {"None": None, "True": True, "False": False}
    if text in literals:
        return literals[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cmd_list(_args) -> None:
    found = analyses()
    if not found:
        raise CommandError(f"no analysis notebooks in '{notebooks_dir()}'")
    for name, notebook in found.items():
        print(name)
        for key, info in _parameters(notebook).items():
            help_text = f"  # {info['help']}" if info.get("help") else ""
            print(f"    {key} = {info['default']}{help_text}")


def cmd_run(args) -> None:
    import papermill

    found = analyses()
    if args.name not in found:
        raise CommandError(f"unknown analysis {args.name!r}; known: {', '.join(found) or 'none'}")
    notebook = found[args.name]
    known = _parameters(notebook)
    parameters = {}
    for key, text in args.parameter or []:
        if key not in known:
            raise CommandError(
                f"{args.name} has no parameter {key!r}; its parameters are {', '.join(known)}"
            )
        if key in ("input_path", "output_dir"):
            raise CommandError(f"give {key} with --input/--output-dir, not -p")
        parameters[key] = _value(text)
    if args.input is not None:
        source = Path(args.input)
        if not source.is_file():
            raise CommandError(f"input file '{source}' does not exist")
        parameters["input_path"] = str(source.resolve())
    output_dir = Path(args.output_dir).resolve()
    parameters["output_dir"] = str(output_dir)

    scratch = Path(tempfile.mkdtemp(prefix=f"stemml-{args.name}-"))
    executed = scratch / f"{args.name}.ipynb"
    try:
        papermill.execute_notebook(
            str(notebook), str(executed), parameters=parameters, cwd=str(scratch),
            progress_bar=not args.quiet, kernel_name=args.kernel,
        )
    except papermill.PapermillExecutionError as exc:
        reason = str(exc.evalue).strip().splitlines()[0] if exc.evalue else ""
        raise CommandError(
            f"{args.name} failed: {exc.ename}: {reason} (executed notebook kept in '{executed}')"
        ) from None
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{args.name}.ipynb"
    shutil.move(executed, target)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.name}: results and executed notebook in '{output_dir}'")


def cmd_book(args) -> None:
    book = ROOT / "book"
    jupyter_book = Path(sys.executable).with_name("jupyter-book")  # installed beside this Python
    command = [str(jupyter_book), "build", str(book), "--builder", "html", "-W", "-n", "--keep-going"]
    config = None
    if args.no_execute:
        # Render the stored (nbval-verified) outputs instead of executing again.
        text = (book / "_config.yml").read_text(encoding="utf-8")
        text = text.replace("execute_notebooks: cache", "execute_notebooks: 'off'")
        handle, config = tempfile.mkstemp(suffix=".yml", dir=book, prefix=".config-noexec-")
        os.close(handle)
        Path(config).write_text(text, encoding="utf-8")
        command += ["--config", config, "--all"]
    try:
        result = subprocess.run(command, cwd=ROOT)
    finally:
        if config:
            os.remove(config)
    if result.returncode != 0:
        raise CommandError(f"the book build failed (exit status {result.returncode}); see the log above")
    print(f"The book is in {book / '_build' / 'html' / 'index.html'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemml", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the analyses and their parameters").set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="run an analysis notebook on your data")
    run.add_argument("name", help="analysis name (see 'stemml list')")
    run.add_argument("--input", help="input file (anything HyperSpy reads); default: the built-in sample")
    run.add_argument("--output-dir", required=True, help="folder for results and the executed notebook")
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
                     help="set a notebook parameter (repeatable)")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel to run the notebook with")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)
    book = sub.add_parser("book", help="build the Jupyter Book into book/_build/html")
    book.add_argument("--no-execute", action="store_true",
                      help="render the notebooks' stored outputs instead of executing them")
    book.set_defaults(func=cmd_book)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CommandError as exc:
        print(f"stemml: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
