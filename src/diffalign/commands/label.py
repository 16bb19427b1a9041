"""``diffalign label``: the labelling web page, annotator tokens, and the export of votes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import fail


def register(app: typer.Typer) -> None:
    @app.command("label")
    def label_cmd(
        pairs_dir: Path = typer.Argument(..., help="Directory holding pairs.jsonl (e.g. from `diffalign make-pairs`)."),
        db: Path = typer.Option(..., "--db", help="SQLite file of annotators and votes (created if missing)."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
        port: int = typer.Option(8000, help="TCP port."),
        tokens: Optional[Path] = typer.Option(None, "--tokens", help="File of 'NAME TOKEN' lines: extra annotators."),
        add_annotator: Optional[str] = typer.Option(None, "--add-annotator",
                                                    help="Register annotator NAME, print its token and exit."),
        export: Optional[Path] = typer.Option(None, "--export", help="Write the majority-vote pairs to this JSONL "
                                                                     "file and exit."),
        per_annotator: bool = typer.Option(False, "--per-annotator",
                                           help="With --export: one line per annotator's a/b vote (with that "
                                                "annotator) instead of one majority-vote line per pair."),
    ) -> None:
        """Serve a web page on which people label preference pairs; or add an annotator; or export the votes."""
        from ..data.votes import PairSet, VoteStore, export_votes, read_tokens_file

        if add_annotator is not None and export is not None:
            fail("give at most one of --add-annotator NAME and --export FILE")
        if add_annotator is not None:
            store = VoteStore(db)
            try:
                token = store.add_annotator(add_annotator)
            finally:
                store.close()
            typer.echo(token)
            typer.echo(f"annotator {add_annotator!r} added to {db}; they open http://HOST:PORT/?token={token}",
                       err=True)
            return
        if per_annotator and export is None:
            fail("--per-annotator applies to --export FILE")
        if export is not None and per_annotator:
            s = export_votes(pairs_dir, db, export, per_annotator=True)
            typer.echo(f"wrote {s['pairs']} per-annotator pairs to {export} from {s['votes']} votes "
                       f"({s['left_out']} tie, skip or unknown-pair votes left out)")
            return
        if export is not None:
            s = export_votes(pairs_dir, db, export)
            typer.echo(f"wrote {s['pairs']} pairs ({s['ties']} ties) to {export} from {s['votes']} votes; "
                       f"{s['left_out']} pairs without votes (or with skips only) left out"
                       + (f"; ignored {s['votes_on_unknown_pairs']} votes on pair ids not in {pairs_dir}"
                          if s["votes_on_unknown_pairs"] else ""))
            return
        from ..data.label_app import serve

        extra = read_tokens_file(tokens) if tokens is not None else {}
        pairs = PairSet(pairs_dir)  # fail early on a bad pairs directory
        store = VoteStore(db)
        names = sorted(set(store.annotators()) | set(extra.values()))
        store.close()
        if not names:
            fail(f"no annotators: add one with `diffalign label {pairs_dir} --db {db} --add-annotator NAME` "
                 f"or pass --tokens FILE")
        typer.echo(f"labelling {len(pairs)} pairs from {pairs_dir} on http://{host}:{port}/ for {len(names)} "
                   f"annotators ({', '.join(names)}); each opens http://{host}:{port}/?token=THEIR_TOKEN", err=True)
        try:
            serve(pairs_dir, db, host=host, port=port, tokens=extra)
        except ImportError as e:
            fail(str(e))
