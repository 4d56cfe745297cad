"""Triton python-backend model that answers a constant: the serving floor every variant is measured against.

Same inputs and outputs as a dyngate variant (one BYTES input [batch, 1]; RESULT BYTES [batch, 1] and LOGITS FP32
[batch, C]), no preprocessing and no engine: what is left of a round trip through it is Triton's front end, the
scheduler and the python backend's hand-over to the stub process and back. The repository writer copies this
file as `model.py` (`dyngate_build.repository.write_floor_model`); `make bench` serves it beside the variants.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.result_name, self.logits_name = (o["name"] for o in config["output"])
        shape = config["parameters"]["logits_shape"]["string_value"]
        self.logits_shape = tuple(int(d) for d in shape.split(","))
        self.answer = json.dumps({"label": "floor", "score": 1.0}).encode()

    def execute(self, requests):
        responses = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(self.result_name, np.array([[self.answer]] * n, dtype=np.object_)),
                pb_utils.Tensor(self.logits_name, np.zeros((n,) + self.logits_shape, dtype=np.float32)),
            ]))
        return responses
