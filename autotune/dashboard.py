"""``autotune dashboard``: serve a study with optuna-dashboard, on this machine only by default."""

from __future__ import annotations

from pathlib import Path

from autotune.errors import UserError


def storage_url(output: str | None, storage: str | None) -> str:
    """The study storage of a search's output folder, or the URL given."""
    if storage:
        return storage
    db = Path(output or "autotune-out") / "study.db"
    if not db.is_file():
        raise UserError(f"no study at {db}; run a search first or pass --storage URL")
    return f"sqlite:///{db.resolve()}"


def serve(args) -> int:
    from optuna_dashboard import run_server
    from rich.console import Console

    url = storage_url(args.output, args.storage)
    shown = "127.0.0.1" if args.host in ("127.0.0.1", "localhost") else args.host
    Console(stderr=True).print(
        f"optuna-dashboard on [bold]http://{shown}:{args.port}/dashboard[/] (Ctrl-C stops it)"
        + ("" if args.host in ("127.0.0.1", "localhost") else "  [yellow]reachable from other machines[/]")
    )
    try:
        run_server(url, host=args.host, port=args.port)
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port} ({exc.strerror}); choose another --port") from exc
    except KeyboardInterrupt:
        return 0
    return 0
