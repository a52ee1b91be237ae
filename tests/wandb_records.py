"""Read back an offline run's .wandb file as `wandb sync` does: the LevelDB-log framing (32 KiB blocks, 7-byte
record headers) around wandb's own protobuf Records (wandb.proto.wandb_internal_pb2)."""
import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def finished_records(path: Path, wait_s: float = 60) -> list:
    """The records of a finished run: wandb's service may still be writing the file when run.finish() has returned,
    so read again until the exit record is there."""
    deadline = time.monotonic() + wait_s
    while True:
        found = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def runs(run_dir: Path) -> list[dict]:
    """One dict per offline wandb run in run_dir/wandb: its id, group, name, config, history steps, exit code.
    Only the newest may still be written; an earlier one (its process has ended) is read as it is: a run killed by
    a signal has no exit record, and waiting for one would only cost the time-out."""
    out = []
    files = sorted(Path(run_dir, "wandb").glob("offline-run-*/*.wandb"))
    for f in files:
        info = {"history_steps": [], "exit_code": None, "preempting": False, "config": {}}
        for r in (finished_records(f) if f == files[-1] else records(f)):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info.update(run_id=r.run.run_id, group=r.run.run_group, name=r.run.display_name)
                info["config"].update({c.key: json.loads(c.value_json) for c in r.run.config.update})
            elif kind == "config":
                info["config"].update({c.key: json.loads(c.value_json) for c in r.config.update})
            elif kind == "history":
                info["history_steps"].append(r.history.step.num)
            elif kind == "exit":
                info["exit_code"] = r.exit.exit_code
            elif kind == "preempting":
                info["preempting"] = True
        out.append(info)
    return out
