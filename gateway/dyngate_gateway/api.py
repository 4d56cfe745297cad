"""The gateway's plain HTTP routes beside the Gradio page: POST /api/predict, GET /api/status, GET /api/models,
GET /api/shadow (?model=M: the shadow traffic counts of dyngate_gateway.shadow), GET /api/cascade (?model=M and
within_pt=P or at_least=A: the `cascade` threshold for that dev-metric target, its expected metric and share of
requests escalating; 400 for a bad target, 409 for variants built without dev scores), GET /metrics (the
gateway's Prometheus metrics, dyngate_gateway/telemetry.py). A GET route answers a query parameter it does not
read with 400 naming the ones it reads (its function's parameters), and one given twice with 400 naming it
(FastAPI would keep the last value).

POST /api/predict with JSON {"model", "text" | "image_base64", "policy", "variant", "accuracy_budget" (points),
"threshold", "exit_threshold"} -> the route answer; bad input (a field given twice too) -> 400 {"error": ...},
unknown model -> 404, a body over limits.max_body_bytes (any route) -> 413, Triton down -> 503, another method
-> 405. It is answered ahead of FastAPI's stack (`ApiFront`). With a login, every route but Gradio's login page
and static files asks for it (HTTP basic auth here; Gradio's login cookie too on the routes
Gradio itself would answer without it, `GRADIO_UNGUARDED`).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets

import gradio as gr
import orjson
from fastapi import FastAPI, Request  # module level: the routes' annotations are resolved from here
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import Mount

from dyngate_build.errors import ConfigError, InputError, RepositoryError, ServingError
from dyngate_gateway import models_view
from dyngate_gateway.config import DEFAULT_HOST, DEFAULT_PORT
from dyngate_gateway.handlers import IMAGE_FORMATS_TEXT, image_from_base64
from dyngate_gateway.middleware import BodySizeLimit, LoginPageScrub, LoginRequired

# Routes Gradio answers without its login; with a login set, the gateway asks for it there too.
GRADIO_UNGUARDED = ("/openapi.json", "/gradio_api/startup-events")


def _object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict; InputError when it has a key twice (json would keep the last value silently)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        keys = [key for key, _ in pairs]
        repeated = {key: [_short(v) for k, v in pairs if k == key] for key in obj if keys.count(key) > 1}
        raise InputError("the body gives field(s) more than once: "
                         + ", ".join(f"{key} ({', '.join(values)})" for key, values in repeated.items())
                         + "; JSON would keep only the last: send each field once, with the value you mean")
    return obj


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# made once: json.loads with object_pairs_hook makes a decoder per call (+1.7-2.6 µs a small body here); json_body
# parsed predict bodies as fast as plain json.loads (within ±1.5 µs, noise)
_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def json_body(raw: bytes):
    """json.loads(raw) (UTF-8/16/32 as json detects it; ValueError for what is not JSON) that raises InputError for
    an object with a repeated key."""
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def create_app(demo: gr.Blocks, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
    """A FastAPI app with the JSON routes, and the Gradio page mounted at "/" (with the login, if any)."""
    state = demo.dyngate  # the GatewayState build_app attached
    auth = state.config.auth
    limits = state.config.limits
    app = FastAPI(title=demo.title, docs_url=None, redoc_url=None, openapi_url=None)  # Gradio's API page documents it
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    mounted = {}  # "gradio": the mounted Gradio app, once mounted below
    if auth:
        app.add_middleware(LoginPageScrub)
        app.add_middleware(LoginRequired, paths=GRADIO_UNGUARDED,
                           allowed=lambda scope: authorized(Request(scope)) or logged_in(Request(scope)))

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def unknown_model(model: str) -> JSONResponse:
        return error(404, f"unknown model {model!r}; the repository's models are: {', '.join(state.catalog)}")

    def authorized(request: Request) -> bool:
        if not auth:
            return True
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, auth[0]) and secrets.compare_digest(password, auth[1])

    def logged_in(request: Request) -> bool:
        """Whether the request carries the login cookie Gradio set on its login page (its own check, routes.py
        get_current_user: the access-token cookie looked up in the app's tokens)."""
        gradio = mounted.get("gradio")
        if gradio is None:
            return False
        token = (request.cookies.get(f"access-token-{gradio.cookie_id}")
                 or request.cookies.get(f"access-token-unsecure-{gradio.cookie_id}"))
        return token is not None and gradio.tokens.get(token) is not None

    def unauthorized() -> JSONResponse:
        return JSONResponse({"error": "login required: HTTP basic auth with the gateway's user and password"},
                            status_code=401, headers={"WWW-Authenticate": 'Basic realm="dyngate"'})

    def guarded(fn):
        """fn() behind the login, and 400 for a query parameter the route does not read: the route's function
        declares the ones it reads, and FastAPI's view of that signature (the matched route's `dependant`) is the
        one list; a misspelt parameter would otherwise be ignored silently."""
        def wrapper(request: Request):
            if not authorized(request):
                return unauthorized()
            route = request.scope["route"]
            allowed = [p.name for p in route.dependant.query_params]
            keys = dict.fromkeys(request.query_params)  # each name once, in order
            unknown = [key for key in keys if key not in allowed]
            if unknown:
                reads = f"it reads only {allowed}; correct or drop the unknown one(s)" if allowed else \
                    "it reads no query parameters; drop them"
                return error(400, f"unknown query parameter(s) {unknown} for GET {route.path}: {reads}")
            repeated = {key: values for key in keys if len(values := request.query_params.getlist(key)) > 1}
            if repeated:  # FastAPI would keep the last value silently
                return error(400, f"query parameter(s) given more than once for GET {route.path}: "
                                  + ", ".join(f"{key} ({values})" for key, values in repeated.items())
                                  + "; send each once, with the value you mean")
            return fn()
        return wrapper

    async def predict(body) -> JSONResponse:
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object: {\"model\": ..., \"text\": ... | \"image_base64\": "
                              "..., \"policy\": ...}")
        allowed = {"model", "text", "image_base64", "policy", "variant", "accuracy_budget", "threshold",
                   "exit_threshold"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            return error(400, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        state.refresh()
        model = body.get("model")
        if model is None:
            return error(400, f"model is required: one of the repository's models ({', '.join(state.catalog)})")
        if not isinstance(model, str):
            return error(400, f"model must be a string naming one of the repository's models "
                              f"({', '.join(state.catalog)}), not {type(model).__name__}")
        if model not in state.catalog:
            return unknown_model(model)
        for key in ("text", "image_base64", "policy", "variant"):
            if body.get(key) is not None and not isinstance(body[key], str):
                return error(400, f"{key} must be a string, not {type(body[key]).__name__}")
        for key in ("accuracy_budget", "threshold"):  # exit_threshold: the router applies Triton's own rule
            value = body.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                return error(400, f"{key} must be a number (a JSON number such as 1.0, not \"1.0\"), not "
                                  f"{type(value).__name__} {value!r}")
        if body.get("text") is not None and body.get("image_base64") is not None:
            return error(400, "send one input: text (text models) or image_base64 (image models), not both")
        if body.get("image_base64") is not None and state.catalog[model].is_text:
            return error(400, f"{model} is a text model: send \"text\", not \"image_base64\"")
        image = None
        if body.get("image_base64"):
            try:
                image = image_from_base64(body["image_base64"])
            except InputError as e:
                return error(400, str(e))
        elif not state.catalog[model].is_text:
            return error(400, f"image_base64 is missing: {model} is an image model; send the image file's bytes in "
                              f"base64 as \"image_base64\" ({IMAGE_FORMATS_TEXT})"
                              + (", not \"text\"" if body.get("text") is not None else ""))
        text = body.get("text")
        try:
            answer = await state.telemetry.routed(state.catalog[model], body.get("policy"), lambda: state.router.aroute(
                model, text, body.get("policy"),  # None: the router's default ('variant' with a variant, else fastest)
                variant=body.get("variant"),
                accuracy_budget=body.get("accuracy_budget"), threshold=body.get("threshold"),
                exit_threshold=body.get("exit_threshold"), image=image))
        except InputError as e:
            return error(400, str(e))
        except (ValueError, TypeError, OverflowError) as e:  # e.g. float("abc"), float(10**400)
            return error(400, f"bad field value: {e}")
        except ServingError as e:
            return error(503, str(e))
        except RepositoryError as e:  # a variant's runtime.json unreadable (stale or broken): the server's fault
            return error(500, str(e))
        return Response(orjson.dumps(answer), media_type="application/json")  # 1 µs; JSONResponse (json) 17 µs

    async def api_predict(request: Request):
        if not authorized(request):
            return unauthorized()
        if request.scope["query_string"]:  # as the GET routes refuse what they do not read (a trial: ?x=1 passed)
            return error(400, f"POST /api/predict reads no query parameters (got "
                              f"{request.scope['query_string'].decode('latin-1')[:100]!r}); send every field in the "
                              "JSON body")
        try:  # json, not orjson: orjson reads integers over 64 bits as floats (other field types, other messages)
            body = json_body(await request.body() or b"null")
        except InputError as e:  # a repeated key
            return error(400, str(e))
        except ValueError as e:
            return error(400, f"the body is not JSON: {e}")
        except RecursionError:
            return error(400, "the body is not JSON this route accepts: nested too deeply")
        return await predict(body)  # on the event loop: the router awaits Triton through the loop's shared client

    async def predict_endpoint(scope, receive, send):
        response = await api_predict(Request(scope, receive))
        await response(scope, receive, send)

    @app.get("/api/status")
    def api_status(request: Request):
        def status():
            ready, line = state.status()
            return JSONResponse({"triton_ready": ready, "triton": state.clients.url, "status": line},
                                status_code=200 if ready else 503)
        return guarded(status)(request)

    @app.get("/api/shadow")
    def api_shadow(request: Request, model: str | None = None):
        def stats():
            if model is not None:
                state.refresh()
                if model not in state.catalog:
                    return unknown_model(model)
            return JSONResponse(state.shadow.stats(model))
        return guarded(stats)(request)

    @app.get("/api/cascade")
    def api_cascade(request: Request, model: str | None = None, within_pt: str | None = None,
                    at_least: str | None = None):
        def choose():
            if not model:
                return error(400, f"model is required: /api/cascade?model=M&within_pt=P (M one of "
                                  f"{', '.join(state.catalog)})")
            state.refresh()
            if model not in state.catalog:
                return unknown_model(model)
            targets = {}
            for key, value in (("within_pt", within_pt), ("at_least", at_least)):
                if value is not None:
                    try:
                        targets[key] = float(value)
                    except ValueError:
                        return error(400, f"{key}={value!r} is not a number")
            try:
                return JSONResponse(state.cascade_choice(model, **targets).as_dict())
            except ConfigError as e:
                return error(400, str(e))
            except RepositoryError as e:  # variants built before dev scores were stored
                return error(409, str(e))
        return guarded(choose)(request)

    @app.get("/metrics")
    def prometheus_metrics(request: Request):
        def scrape():
            body, content_type = state.telemetry.exposition()
            return Response(body, media_type=content_type)
        return guarded(scrape)(request)

    @app.get("/api/models")
    def api_models(request: Request):
        def rows():
            return JSONResponse([dict(zip(models_view.HEADERS, r))
                                 for r in models_view.model_rows(state.repository, state.clients)])
        return guarded(rows)(request)

    json_routes = {route.path: tuple(sorted(route.methods)) for route in app.routes if isinstance(route, APIRoute)}
    json_routes["/api/predict"] = ("POST",)
    app = gr.mount_gradio_app(app, demo, path="/", server_name=host, server_port=port, auth=auth, ssr_mode=False,
                              footer_links=["api"], max_file_size=limits.max_image_bytes)
    mounted["gradio"] = next(r.app for r in app.routes if isinstance(r, Mount))
    return ApiFront(app, BodySizeLimit(predict_endpoint, max_bytes=limits.max_body_bytes), json_routes)


class ApiFront:
    """ASGI in front of the FastAPI app: POST /api/predict goes straight to `predict` (the route's own function
    behind the same body limit); a JSON route (`methods`: path -> the methods it answers) asked with another
    method gets 405 {"error"} with Allow (behind it, the Gradio page mounted at "/" would answer 404 {"detail"});
    every other request goes to `app` (FastAPI: its middleware stack, its router, the Gradio page).
    FastAPI's stack in front of a route (error, body-limit, telemetry, exception and exit-stack middlewares, the
    route table, Starlette's request/response wrapper) was ~5-8% of the gateway's CPU samples per predict
    (py-spy); with this and a cheaper repository check the gateway's added round trip fell 0.26-0.35 ms
    (scripts/bench_gateway.py --before-pythonpath). Same answers: the route's checks (login, body, fields) are
    all in `predict`; an unexpected error is uvicorn's 500, as ServerErrorMiddleware's would be."""

    def __init__(self, app, predict, methods: dict[str, tuple[str, ...]]):
        self.app, self.predict, self.methods = app, predict, methods

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.methods:
            if scope["path"] == "/api/predict" and scope["method"] == "POST":
                return await self.predict(scope, receive, send)
            allowed = self.methods[scope["path"]]
            if scope["method"] not in allowed:
                usage = ("send POST with a JSON body {\"model\": ..., \"text\" | \"image_base64\": ...}"
                         if allowed == ("POST",) else "send GET")
                response = JSONResponse({"error": f"{scope['method']} {scope['path']}: {usage}"},
                                        status_code=405, headers={"Allow": ", ".join(allowed)})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
