"""Roll a running Triton over to new version folders, and the build's hook that does it after a publish.

Life cycle of a served variant (explicit model control, `version_policy: { latest { num_versions: 1 } }`):
`roll_out` asks a running Triton to load the newest version folder of a model, checks that version is READY
(Triton keeps serving the old one until then, and keeps it when the new one fails to load), waits until the
old versions are unloaded and deletes their folders. `dyngate reload` uses it; `dyngate build --triton` passes
`after_publish(client)` to `dyngate_build.pipeline.build` so every published variant is rolled out.
Model control goes over gRPC (`dyngate_serving.client.model_control_client`).

    client = model_control_client("127.0.0.1:8001")
    client.index()                      # raises TritonUnreachable before any work
    build(options, after_publish=after_publish(client))
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dyngate_build.errors import ServingError
from dyngate_build.repository import Published, keep_previous_version, remove_versions, version_numbers
from dyngate_serving.client import TritonClient, short_reason

ROLL_OUT_SETTLE_S = 120.0  # how long roll_out waits for Triton to finish unloading the old versions
_ACTIVE = ("READY", "LOADING", "UNLOADING")
_POLL_S = 0.1


@dataclass
class RollOut:
    """What `roll_out` did: the version Triton now serves and the old version folders deleted."""

    name: str
    version: int
    removed: list[int]


def roll_out(client: TritonClient, folder: Path, log=print, settle_s: float = ROLL_OUT_SETTLE_S) -> RollOut:
    """Make Triton serve the newest version folder of the model folder `folder`, then delete the older ones.

    Triton (explicit model control, `latest { num_versions: 1 }`) loads the newest version and unloads the old
    one only once the new one is READY, so requests never find the model missing. The old version folders are
    deleted once the index shows them neither READY, LOADING nor UNLOADING; if that takes longer than
    `settle_s` seconds they stay on disk (logged) for the next roll-out.

    client: a model-control client (`model_control_client`: gRPC, so loading stalls no inference).
    Raises ServingError naming the version and Triton's reason when the new version does not load; Triton then
    still serves what it served before and nothing is deleted. TritonUnreachable when Triton does not answer.
    """
    folder = Path(folder)
    name = folder.name
    on_disk = version_numbers(folder)
    if not on_disk:
        raise ServingError(f"{folder} has no version folder to load; run `dyngate build` first")
    newest, older = on_disk[-1], on_disk[:-1]
    try:
        client.load(name)
    except ServingError as e:
        served = sorted(v for v, m in client.versions(name).items() if m.get("state") == "READY")
        keeps = f"it keeps serving version {served[-1]}" if served else "it serves no version of it"
        raise ServingError(f"Triton refused version {newest} of {name}: {e}; {keeps}") from e
    state = client.versions(name).get(newest, {})
    if state.get("state") != "READY":
        raise ServingError(f"Triton loaded {name} but version {newest} is {state.get('state') or 'unknown'}: "
                           f"{short_reason(state.get('reason', ''))}")
    log(f"  {name}: Triton serves version {newest}")
    deadline = time.monotonic() + settle_s
    while True:
        versions = client.versions(name)
        busy = [v for v in older if versions.get(v, {}).get("state") in _ACTIVE]
        if not busy:
            break
        if time.monotonic() > deadline:
            log(f"  {name}: Triton still holds version(s) {busy} after {settle_s:.0f} s; their folders stay "
                "until the next roll-out")
            older = [v for v in older if v not in busy]
            break
        time.sleep(_POLL_S)
    removed = remove_versions(folder, older)
    if removed:
        log(f"  {name}: removed old version folder(s) {', '.join(map(str, removed))}")
    return RollOut(name, newest, removed)


def after_publish(client: TritonClient, log=print) -> Callable[[list[Published]], None]:
    """The build's `after_publish` hook for a running Triton (`dyngate build --triton`).

    Once the build's model folders are in the repository, every one that Triton serves (and every new
    python-backend model) is rolled out (`roll_out`); the others (e.g. a native flavour on the embedded server)
    keep their previous version folders as a build without Triton does
    (`dyngate_build.repository.keep_previous_version`). When a roll-out fails, that model and every one not
    rolled out yet are put back as they were (`Published.undo`; Triton still serves their previous versions)
    and ServingError is raised naming them.
    """

    def after(published: list[Published]) -> None:
        pending = list(published)
        try:
            loaded = client.ready_models()
            while pending:
                p = pending[0]
                if p.name in loaded or (p.is_new and p.backend == "python"):
                    roll_out(client, p.folder, log)
                else:  # not served by this Triton (e.g. a native flavour on the embedded server)
                    keep_previous_version(p, log)
                pending.pop(0)
        except ServingError as e:
            for p in pending:
                p.undo()
            names = ", ".join(p.name for p in pending)
            raise ServingError(f"{e}. The repository keeps {names} as before this build") from e

    return after
