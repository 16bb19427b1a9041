"""The labelling web page (``diffalign label``): FastAPI, server-rendered jinja2 templates, SQLite.

An annotator opens ``/?token=TOKEN`` once (the link the organiser hands out); the page stores the
token in an HttpOnly, SameSite=Strict cookie and redirects to ``/``, which shows the prompt and
the two images of the first pair this annotator has not voted on, side by side. The display order
of a pair's images is shuffled per annotator (a hash of annotator and pair id), so a pairs file
whose first image is always the reward's favourite does not teach annotators to click left.
Votes: click, or the keys Left/1, Right/2, Down/T (tie), S (skip), U/Backspace (undo the last
vote). API clients send ``Authorization: Bearer TOKEN`` instead of the cookie.

Routes (all but ``/health`` need a token: none -> 401, unknown -> 403):

=======================  ==================================================================
``GET /``                 the next pair (``/?token=`` logs in)
``GET /pair/{id}``        a given pair (404 if unknown)
``GET /images/{path}``    an image of a pair; only files named in ``pairs.jsonl`` (else 404)
``POST /vote``            form ``pair_id``, ``choice`` in ``a|b|tie|skip``; redirects to ``/``
``POST /undo``            deletes one's latest vote; redirects to ``/``
``POST /api/vote``        JSON ``{"pair_id", "choice"}`` -> ``{"status": "recorded"|"duplicate"}``
``POST /api/undo``        -> ``{"undone": {"pair_id", "choice"} | null}``
``GET /api/next``         the next pair as JSON (``{"done": true}`` when none is left)
``GET /health``           ``{"ok": true, "pairs": N}``
=======================  ==================================================================

A vote on a pair one already voted on differently is refused with 409 (undo first); the same vote
again (a retry) is acknowledged as ``duplicate`` and stored once.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at definition time

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

from .votes import CHOICES, Auth, PairSet, VoteConflict, VoteStore

COOKIE = "diffalign_label_token"
TEMPLATES = Path(__file__).parent / "templates"


def _fastapi():
    try:
        import fastapi
        import jinja2  # noqa: F401
        import python_multipart  # noqa: F401  (form posts)
    except ImportError as e:
        raise ImportError(f"the labelling page needs fastapi, jinja2 and python-multipart ({e}); "
                          f"install them with `pip install diffalign[ui]`") from e
    return fastapi


def left_first(annotator: str, pair_id: str) -> bool:
    """Whether image ``a`` is shown on the left for this annotator (a fixed coin flip per pair)."""
    return hashlib.sha256(f"{annotator}\0{pair_id}".encode()).digest()[0] % 2 == 0


def create_app(pairs_dir: str | os.PathLike, db_path: str | os.PathLike, tokens: Mapping[str, str] | None = None):
    """The labelling app for ``pairs_dir/pairs.jsonl`` with votes in ``db_path``.

    ``tokens`` maps extra tokens to annotator names (``--tokens FILE``); tokens registered in the
    database (``diffalign label --add-annotator NAME``) are accepted too, also ones added while the
    app runs."""
    fastapi = _fastapi()
    from fastapi import Depends, Form, HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
    from fastapi.templating import Jinja2Templates

    pairs = PairSet(pairs_dir)
    store = VoteStore(db_path)
    auth = Auth(store, tokens)
    templates = Jinja2Templates(directory=str(TEMPLATES))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        store.close()

    app = fastapi.FastAPI(title="diffalign label", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store, app.state.pairs = store, pairs

    def wants_html(request: Request) -> bool:
        return "text/html" in request.headers.get("accept", "")

    @app.exception_handler(HTTPException)
    async def errors(request: Request, exc: HTTPException):
        if wants_html(request):
            return templates.TemplateResponse(request, "error.html", {"status": exc.status_code, "detail": exc.detail},
                                              status_code=exc.status_code, headers=exc.headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    def annotator(request: Request) -> str:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        token = token or request.query_params.get("token") or request.cookies.get(COOKIE)
        if not token:
            raise HTTPException(401, "no annotator token: open the link with ?token=... that you were given, "
                                     "or send 'Authorization: Bearer TOKEN'", headers={"WWW-Authenticate": "Bearer"})
        name = auth(token)
        if name is None:
            raise HTTPException(403, "unknown annotator token")
        return name

    def get_pair(pair_id: str):
        pair = pairs.by_id.get(pair_id)
        if pair is None:
            raise HTTPException(404, f"no pair with id {pair_id!r}")
        return pair

    def progress(votes: dict[str, str]) -> dict[str, int]:
        done = sum(1 for pid in votes if pid in pairs.by_id)
        return {"done": done, "total": len(pairs)}

    def next_pair(votes: dict[str, str]):
        return next((p for p in pairs.pairs if p.pair_id not in votes), None)

    def view(name: str, pair) -> dict[str, Any]:
        sides = [("a", pair.a), ("b", pair.b)]
        if not left_first(name, pair.pair_id):
            sides.reverse()
        return {"pair_id": pair.pair_id, "prompt": pair.prompt,
                "left": {"key": sides[0][0], "url": f"/images/{quote(sides[0][1])}"},
                "right": {"key": sides[1][0], "url": f"/images/{quote(sides[1][1])}"}}

    def page(request: Request, name: str, pair, votes: dict[str, str]):
        ctx = {"annotator": name, "progress": progress(votes), "pair": None if pair is None else view(name, pair),
               "current": None if pair is None else votes.get(pair.pair_id), "can_undo": bool(votes)}
        return templates.TemplateResponse(request, "label.html", ctx, headers={"Cache-Control": "no-store"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "pairs": len(pairs)}

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, name: str = Depends(annotator)):
        if "token" in request.query_params:  # log in: keep the token in a cookie, drop it from the URL
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, request.query_params["token"], httponly=True, samesite="strict")
            return response
        votes = store.votes_of(name)
        return page(request, name, next_pair(votes), votes)

    @app.get("/pair/{pair_id}", response_class=HTMLResponse)
    def show_pair(request: Request, pair_id: str, name: str = Depends(annotator)):
        pair = get_pair(pair_id)
        return page(request, name, pair, store.votes_of(name))

    @app.get("/images/{path:path}")
    def image(path: str, name: str = Depends(annotator)):
        file = pairs.images.get(path)  # only the images pairs.jsonl names: no traversal, no other files
        if file is None:
            raise HTTPException(404, "no such image")
        return FileResponse(file, headers={"Cache-Control": "private, max-age=3600"})

    def record(name: str, pair_id: str, choice: str) -> bool:
        get_pair(pair_id)
        if choice not in CHOICES:
            raise HTTPException(422, f"choice must be one of {list(CHOICES)}, got {choice!r}")
        try:
            return store.vote(name, pair_id, choice)
        except VoteConflict as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/vote")
    def vote_form(pair_id: str = Form(...), choice: str = Form(...), name: str = Depends(annotator)):
        record(name, pair_id, choice)
        return RedirectResponse("/", status_code=303)

    @app.post("/undo")
    def undo_form(name: str = Depends(annotator)):
        undone = store.undo(name)
        return RedirectResponse("/" if undone is None else f"/pair/{quote(undone[0], safe='')}", status_code=303)

    @app.post("/api/vote")
    def vote_api(body: dict, name: str = Depends(annotator)) -> dict[str, Any]:
        pair_id, choice = body.get("pair_id"), body.get("choice")
        if not isinstance(pair_id, str) or not isinstance(choice, str):
            raise HTTPException(422, "body must be {\"pair_id\": str, \"choice\": \"a\"|\"b\"|\"tie\"|\"skip\"}")
        return {"status": "recorded" if record(name, pair_id, choice) else "duplicate", "pair_id": pair_id,
                "choice": choice}

    @app.post("/api/undo")
    def undo_api(name: str = Depends(annotator)) -> dict[str, Any]:
        undone = store.undo(name)
        return {"undone": None if undone is None else {"pair_id": undone[0], "choice": undone[1]}}

    @app.get("/api/next")
    def next_api(name: str = Depends(annotator)) -> dict[str, Any]:
        votes = store.votes_of(name)
        pair = next_pair(votes)
        return {"done": True, "progress": progress(votes)} if pair is None else \
            {"done": False, "progress": progress(votes), **view(name, pair)}

    return app


def serve(pairs_dir: str | os.PathLike, db_path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
          tokens: Mapping[str, str] | None = None) -> None:
    """Run the labelling app with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"the labelling page needs uvicorn ({e}); install it with `pip install diffalign[ui]`") from e
    uvicorn.run(create_app(pairs_dir, db_path, tokens), host=host, port=port, log_level="warning")
