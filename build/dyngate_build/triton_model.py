"""Triton python-backend model: the one `model.py` every dyngate variant is served with.

The repository writer copies this file to `<model>/<version>/model.py` next to `dyngate_runtime.py` (a copy
of build/dyngate_build/runtime.py), `runtime.json` and the variant's graph. Tensor names come from the model config that
the writer generated from the same spec, so they are never typed twice.

Input: one BYTES tensor (TEXT: UTF-8 text, IMAGE: encoded image), shape [batch, 1].
Outputs: RESULT (BYTES [batch, 1], one JSON answer each) and LOGITS (FP32, [batch, C] or [batch, L, C]).
`execute` merges all requests Triton hands it (dynamic batching) into one engine run, then splits.
A request with bad input gets an INVALID_ARG error response; its neighbours are answered normally. An
unexpected failure of the engine on one group of requests answers that group with INTERNAL errors (naming the
exception) and leaves the model up for the next requests.
Request parameters (e.g. `exit_threshold`) reach the engine as options.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dyngate_runtime import InputError, Predictor, json_default  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.result_name, self.logits_name = (o["name"] for o in config["output"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.predictor = Predictor(folder)

    def execute(self, requests):
        # Requests with different parameters (e.g. exit thresholds) run as separate batches; requests whose
        # parameter text is the same share one engine run (the usual case: one group).
        groups: dict[str, list[int]] = {}
        inputs = []
        for index, request in enumerate(requests):
            groups.setdefault(request.parameters() or "{}", []).append(index)
            values = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            inputs.append([v if isinstance(v, bytes) else str(v).encode() for v in values])
        responses = [None] * len(requests)
        for text, indices in groups.items():
            raws = [raw for i in indices for raw in inputs[i]]
            try:
                results = self.predictor.predict(raws, _options(text))
            except InputError as e:
                results = [e] * len(raws)
            except Exception as e:  # a bug or an engine failure: fail these requests, keep serving
                results = [RuntimeError(f"{type(e).__name__}: {e}")] * len(raws)
            start = 0
            for i in indices:
                responses[i] = self._response(results[start:start + len(inputs[i])])
                start += len(inputs[i])
        return responses

    def _response(self, items):
        errors = [(i, r) for i, r in enumerate(items) if isinstance(r, Exception)]
        if errors:
            where = "" if len(items) == 1 else f"item {errors[0][0]}: "
            error = errors[0][1]
            code = (pb_utils.TritonError.INVALID_ARG if isinstance(error, InputError)
                    else getattr(pb_utils.TritonError, "INTERNAL", pb_utils.TritonError.UNKNOWN))
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(where + str(error), code))
        answers = np.array([[json.dumps(r.answer, default=json_default).encode()] for r in items],
                           dtype=np.object_)
        if len(items) == 1:
            logits = items[0].logits[None]
        else:  # token tasks: pad every item's [L, C] to the longest
            shapes = [r.logits.shape for r in items]
            logits = np.zeros((len(items),) + tuple(max(s) for s in zip(*shapes)), dtype=np.float32)
            for i, r in enumerate(items):
                logits[(i,) + tuple(slice(0, n) for n in r.logits.shape)] = r.logits
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(self.result_name, answers),
            pb_utils.Tensor(self.logits_name, np.ascontiguousarray(logits, dtype=np.float32)),
        ])

    def finalize(self):
        self.predictor = None


def _options(text: str) -> dict:
    """A request's parameters (JSON text from `request.parameters()`) as engine options; {} when unreadable."""
    try:
        options = json.loads(text)
    except ValueError:
        return {}
    return options if isinstance(options, dict) else {}
