"""``diffalign serve-reward`` and ``diffalign train-reward``: thin wrappers over ``diffalign.rewards``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..rewards.registry import names
from . import fail


def register(app: typer.Typer) -> None:
    @app.command("serve-reward")
    def serve_reward(
        name: str = typer.Argument(..., help=f"registry reward to serve: {', '.join(names())}"),
        path: Optional[Path] = typer.Option(None, "--path", help="local model directory, for model rewards"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
        port: int = typer.Option(8000, "--port", help="TCP port"),
        token: Optional[str] = typer.Option(None, "--token", envvar="DIFFALIGN_REWARD_TOKEN",
                                            help="require 'Authorization: Bearer TOKEN' on /score"),
        max_batch: int = typer.Option(64, "--max-batch", help="most images per reward call (requests are batched)"),
        device: Optional[str] = typer.Option(None, "--device", help="device for model rewards, e.g. cuda"),
    ) -> None:
        """Serve a reward over HTTP: POST /score, GET /health (protocol: docs/rewards.md)."""
        from ..rewards.remote import serve_reward as serve

        kwargs = {"device": device} if device else {}
        typer.echo(f"serving reward {name!r} on http://{host}:{port} (POST /score, GET /health)", err=True)
        try:
            serve(name, path=None if path is None else str(path), host=host, port=port, token=token,
                  max_batch=max_batch, **kwargs)
        except ImportError as e:
            fail(str(e))

    @app.command("train-reward")
    def train_reward(
        out: Path = typer.Option(..., "--out", help="directory to write config.json + model.safetensors"),
        world: str = typer.Option("shapes", "--world", help="world that makes the pairs (only 'shapes')"),
        pairs: int = typer.Option(2000, "--pairs", help="number of training pairs to generate"),
        pairs_jsonl: Optional[Path] = typer.Option(None, "--pairs-jsonl",
                                                   help='JSONL of {"prompt","chosen","rejected"} image paths instead'),
        steps: int = typer.Option(1000, "--steps", help="optimisation steps"),
        batch_size: int = typer.Option(128, "--batch-size"),
        lr: float = typer.Option(3e-3, "--lr"),
        corruptions: str = typer.Option("drop,extra,recolor", "--corruptions",
                                        help="shapes corruptions that make the rejected images"),
        val_pairs: int = typer.Option(500, "--val-pairs", help="held-out shapes pairs to report accuracy on (0: skip)"),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Train a Bradley-Terry reward model on preference pairs (loadable as reward 'learned')."""
        from ..rewards.corrupt import CORRUPTIONS
        from ..rewards.learned import (LearnedReward, load_pairs_jsonl, make_shapes_pairs, pair_accuracy,
                                       train_bt_reward)

        kinds = [c.strip() for c in corruptions.split(",") if c.strip()]
        if pairs_jsonl is not None:
            data = load_pairs_jsonl(pairs_jsonl)
        elif world == "shapes":
            data = make_shapes_pairs(pairs, seed=seed, corruptions=kinds)
        else:
            fail(f"unknown world {world!r}; only 'shapes' makes pairs (or pass --pairs-jsonl FILE)")
        typer.echo(f"training on {len(data)} pairs for {steps} steps", err=True)
        res = train_bt_reward(data, out=out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              log_every=max(1, steps // 5))
        typer.echo(f"train pair accuracy {res['train_accuracy']:.3f}  final loss {res['loss']:.4f}")
        if val_pairs > 0 and world == "shapes":
            reward = LearnedReward(out)
            held = make_shapes_pairs(val_pairs, seed=seed + 10_000, corruptions=kinds)
            typer.echo(f"held-out pair accuracy ({','.join(kinds)}) {pair_accuracy(reward, held):.3f}")
            for kind in (k for k in CORRUPTIONS if k not in kinds):
                other = make_shapes_pairs(max(50, val_pairs // 4), seed=seed + 20_000, corruptions=[kind])
                typer.echo(f"held-out pair accuracy on unseen corruption {kind!r} {pair_accuracy(reward, other):.3f}")
        typer.echo(f"saved to {out} (use it as rewards.get('learned', path={str(out)!r}))")
