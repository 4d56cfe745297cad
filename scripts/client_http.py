#!/usr/bin/env python3
"""Call one dyngate variant on Triton over HTTP with the plain tritonclient API (no dyngate import).

    python scripts/client_http.py --model distilbert-tiny__fp32 --text "a gripping, funny film"
    python scripts/client_http.py --model vit-tiny__int8-dynamic --image digit.png --url 127.0.0.1:8000
    python scripts/client_http.py --model distilbert-tiny__early-exit --text "fine" --param exit_threshold=0.9

Every variant takes one BYTES input, TEXT (UTF-8 text) or IMAGE (the encoded file), shape [batch, 1], and
returns RESULT (one JSON answer per item) and LOGITS (FP32). `--param key=value` becomes a Triton request
parameter (numbers and true/false are typed, anything else is a string).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def parse_param(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: write key=value, e.g. exit_threshold=0.9")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of Triton's HTTP endpoint")
    parser.add_argument("--model", required=True, help="Triton model name, e.g. distilbert-tiny__fp32")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text to classify or tag")
    source.add_argument("--image", type=Path, help="image file (PNG, JPEG, ...) to classify")
    parser.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                        help="request parameter, repeatable")
    args = parser.parse_args()

    raw = args.text.encode("utf-8") if args.text is not None else args.image.read_bytes()
    client = httpclient.InferenceServerClient(url=args.url.removeprefix("http://"))
    try:
        metadata = client.get_model_metadata(args.model)
        input_name = metadata["inputs"][0]["name"]  # TEXT or IMAGE
        inputs = [httpclient.InferInput(input_name, [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([[raw]], dtype=np.object_))
        outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in ("RESULT", "LOGITS")]
        started = time.perf_counter()
        result = client.infer(args.model, inputs, outputs=outputs, parameters=dict(args.param) or None)
        latency_ms = (time.perf_counter() - started) * 1000
    except InferenceServerException as e:
        print(f"error from Triton at {args.url}: {e.message()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"Triton at {args.url} is not reachable: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    answer = json.loads(result.as_numpy("RESULT")[0, 0])
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    print(f"logits shape {list(result.as_numpy('LOGITS').shape)}; latency {latency_ms:.1f} ms (HTTP round trip)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
